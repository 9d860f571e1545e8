#!/usr/bin/env bash
# Installs hyper2kvm from this source tree. Run it from anywhere; see --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: packaging/install.sh [--no-build] [--help]

Builds hyper2kvm (cargo build --release) and installs:
  PREFIX/bin/hyper2kvm                       the binary (PREFIX defaults to /usr)
  UNITDIR/hyper2kvm.service                  systemd units (UNITDIR defaults to /etc/systemd/system;
  UNITDIR/hyper2kvm@.service                 use /usr/lib/systemd/system for a distribution-style
  UNITDIR/hyper2kvm.target                   install)
  SYSCONFDIR/hyper2kvm/*.conf                example configuration (SYSCONFDIR defaults to /etc);
                                             an existing file is never overwritten
  SYSUSERSDIR/hyper2kvm.conf                 the hyper2kvm system user, groups libvirt and kvm
                                             (SYSUSERSDIR defaults to PREFIX/lib/sysusers.d)
  TMPFILESDIR/hyper2kvm.conf                 /var/lib/hyper2kvm owned by hyper2kvm
                                             (TMPFILESDIR defaults to PREFIX/lib/tmpfiles.d)
  /var/lib/hyper2kvm                         the state directory
  PREFIX/share/doc/hyper2kvm/                README.md and docs/, when present

Without DESTDIR and as root it also creates the user (systemd-sysusers, else useradd) and
/var/lib/hyper2kvm owned by it, and reloads systemd.

Options:
  --no-build   install target/release/hyper2kvm as it is (e.g. built earlier as a normal user,
               then `sudo packaging/install.sh --no-build`)
  -h, --help   show this help

Environment:
  DESTDIR      stage the install under this directory (for packaging); systemctl is not run
  PREFIX, UNITDIR, SYSCONFDIR, SYSUSERSDIR, TMPFILESDIR   as above
  CARGO_TARGET_DIR              where cargo builds (default: target/ in the source tree)

Afterwards:
  systemctl daemon-reload
  systemctl enable --now hyper2kvm.target hyper2kvm@vsphere.service   # one daemon per instance
EOF
}

build=1
for arg in "$@"; do
    case $arg in
    --no-build) build=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSCONFDIR=${SYSCONFDIR:-/etc}
SYSUSERSDIR=${SYSUSERSDIR:-$PREFIX/lib/sysusers.d}
TMPFILESDIR=${TMPFILESDIR:-$PREFIX/lib/tmpfiles.d}
STATEDIR=/var/lib/hyper2kvm

cd "$(dirname "${BASH_SOURCE[0]}")/.."
target_dir=${CARGO_TARGET_DIR:-target}
bin=$target_dir/release/hyper2kvm

if [ "$build" -eq 1 ]; then
    if ! command -v cargo >/dev/null 2>&1; then
        echo "install.sh: cargo not found. Build as your user first (cargo build --release)," >&2
        echo "install.sh: then run: sudo packaging/install.sh --no-build" >&2
        exit 1
    fi
    cargo build --release
fi
if [ ! -x "$bin" ]; then
    echo "install.sh: $bin not found; run cargo build --release first" >&2
    exit 1
fi

echo "Installing $PREFIX/bin/hyper2kvm"
install -D -m 0755 "$bin" "$DESTDIR$PREFIX/bin/hyper2kvm"

# The units name /usr/bin/hyper2kvm and /etc/hyper2kvm; follow PREFIX and SYSCONFDIR.
for unit in hyper2kvm.service hyper2kvm@.service hyper2kvm.target; do
    echo "Installing $UNITDIR/$unit"
    install -d -m 0755 "$DESTDIR$UNITDIR"
    sed -e "s#/usr/bin/hyper2kvm#$PREFIX/bin/hyper2kvm#g" \
        -e "s#/etc/hyper2kvm/#$SYSCONFDIR/hyper2kvm/#g" \
        -e "s#/usr/share/doc/hyper2kvm#$PREFIX/share/doc/hyper2kvm#g" \
        "systemd/$unit" >"$DESTDIR$UNITDIR/$unit.tmp"
    chmod 0644 "$DESTDIR$UNITDIR/$unit.tmp"
    mv -f "$DESTDIR$UNITDIR/$unit.tmp" "$DESTDIR$UNITDIR/$unit"
done

install -d -m 0755 "$DESTDIR$SYSCONFDIR/hyper2kvm"
for conf in conf.d/*.conf; do
    dest=$DESTDIR$SYSCONFDIR/hyper2kvm/$(basename "$conf")
    if [ -e "$dest" ]; then
        echo "Keeping existing $SYSCONFDIR/hyper2kvm/$(basename "$conf") (the new example is $conf)"
    else
        echo "Installing $SYSCONFDIR/hyper2kvm/$(basename "$conf")"
        install -m 0644 "$conf" "$dest"
    fi
done

echo "Installing $SYSUSERSDIR/hyper2kvm.conf and $TMPFILESDIR/hyper2kvm.conf"
install -D -m 0644 packaging/sysusers.d/hyper2kvm.conf "$DESTDIR$SYSUSERSDIR/hyper2kvm.conf"
install -D -m 0644 packaging/tmpfiles.d/hyper2kvm.conf "$DESTDIR$TMPFILESDIR/hyper2kvm.conf"

live=0
if [ -z "$DESTDIR" ] && [ "$(id -u)" -eq 0 ]; then
    live=1
fi

# The user the units run as (User=hyper2kvm), and its state directory.
if [ "$live" -eq 1 ]; then
    echo "Creating the hyper2kvm user (groups libvirt, kvm) and $STATEDIR"
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers "$SYSUSERSDIR/hyper2kvm.conf"
    else
        getent passwd hyper2kvm >/dev/null ||
            useradd --system --user-group --home-dir "$STATEDIR" --no-create-home \
                --shell /usr/sbin/nologin --comment "hyper2kvm VM import daemon" hyper2kvm
        for group in libvirt kvm; do
            getent group "$group" >/dev/null || groupadd --system "$group"
            usermod --append --groups "$group" hyper2kvm
        done
    fi
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles --create "$TMPFILESDIR/hyper2kvm.conf"
    else
        install -d -m 0755 -o hyper2kvm -g hyper2kvm "$STATEDIR"
    fi
else
    echo "Creating $STATEDIR (run as root without DESTDIR to create the hyper2kvm user too)"
    install -d -m 0755 "$DESTDIR$STATEDIR"
fi

docdir=$DESTDIR$PREFIX/share/doc/hyper2kvm
for doc in README.md docs; do
    if [ -e "$doc" ]; then
        install -d -m 0755 "$docdir"
        cp -R "$doc" "$docdir/"
    fi
done

if [ "$live" -eq 1 ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

cat <<EOF

hyper2kvm installed. Next:
  edit $SYSCONFDIR/hyper2kvm/hyper2kvm.conf (shared) and hyper2kvm-INSTANCE.conf (per daemon)
  systemctl enable --now hyper2kvm.target hyper2kvm@vsphere.service
  journalctl -fu hyper2kvm@vsphere
The daemons run as user hyper2kvm: a queue or output directory outside /var/lib/hyper2kvm
needs write access for it and a drop-in with ReadWritePaths= (docs/OPERATIONS.md).
EOF
