#!/usr/bin/env bash
# Install or upgrade migraine-node on Debian 12 as a systemd service; safe to run again.
#
#   sudo deploy/install.sh                  # from the root of a checkout
#   sudo PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" deploy/install.sh   # CPU-only torch
#   deploy/install.sh --destdir /tmp/stage --skip-venv   # stage the files only (packaging, tests)
#
# What it does (each step only when needed):
#   - system user and group migraine-node (no login, home /var/lib/migraine-node);
#   - /opt/migraine-node/.venv with this checkout pip-installed (torch is pinned in pyproject.toml),
#     and the docs in /opt/migraine-node/docs;
#   - /etc/migraine-node/config.toml from deploy/config.example.toml if absent (0640 root:migraine-node),
#     and an empty /etc/migraine-node/environment for secrets (0640) if absent; existing files are kept;
#   - /var/lib/migraine-node (0700 migraine-node);
#   - /etc/systemd/system/migraine-node.service, then `systemctl daemon-reload`.
# It never starts, restarts or enables the service and never touches the database schema:
# those are the steps it prints at the end.
#
# --destdir DIR (or DESTDIR=DIR): put every file under DIR instead of /. No user is created, nothing is
# chowned and systemctl is not run, so it needs no root.
set -euo pipefail

NAME=migraine-node
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
SKIP_VENV=0
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}

usage() {
    sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    echo "options: --destdir DIR  --skip-venv  --python PYTHON (default python3)  -h|--help"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --destdir) DESTDIR=${2:?--destdir needs a directory}; shift 2 ;;
        --destdir=*) DESTDIR=${1#*=}; shift ;;
        --skip-venv) SKIP_VENV=1; shift ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [ -n "$DESTDIR" ]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
fi
STAGED=0; [ -n "$DESTDIR" ] && STAGED=1

OPT=/opt/$NAME
ETC=/etc/$NAME
DATA=/var/lib/$NAME
UNIT=/etc/systemd/system/$NAME.service

say() { printf '%s\n' "install.sh: $*"; }
die() { printf '%s\n' "install.sh: $*" >&2; exit 1; }

[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/deploy/$NAME.service" ] || die "run me from a migraine-node checkout ($SRC)"
if [ "$STAGED" = 0 ]; then
    [ "$(id -u)" = 0 ] || die "run as root (sudo), or stage files with --destdir DIR"
    [ -f /etc/debian_version ] || say "warning: not Debian; continuing, but only Debian 12 is tested"
fi

# install -d/-m with owner and group only for a real install.
owned() {  # owned OWNER:GROUP install-args...
    local who=$1; shift
    if [ "$STAGED" = 1 ]; then
        install "$@"
    else
        install -o "${who%%:*}" -g "${who##*:}" "$@"
    fi
}

# 1. User and group.
if [ "$STAGED" = 0 ]; then
    if ! getent group "$NAME" >/dev/null; then
        groupadd --system "$NAME"
        say "created group $NAME"
    fi
    if ! getent passwd "$NAME" >/dev/null; then
        useradd --system --gid "$NAME" --home-dir "$DATA" --no-create-home --shell /usr/sbin/nologin \
            --comment "migraine-node DICOM node" "$NAME"
        say "created user $NAME"
    fi
fi

# 2. Directories.
owned root:root -d -m 0755 "$DESTDIR$OPT" "$DESTDIR$OPT/docs" "$DESTDIR/etc/systemd/system"
owned "root:$NAME" -d -m 0750 "$DESTDIR$ETC"
owned "$NAME:$NAME" -d -m 0700 "$DESTDIR$DATA"

# 3. Virtual environment with the node (root-owned: the service cannot change its own code).
if [ "$SKIP_VENV" = 0 ]; then
    "$PYTHON" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 14)))' \
        || die "$PYTHON is not Python 3.11-3.13 (apt-get install python3 python3-venv)"
    if [ ! -x "$DESTDIR$OPT/.venv/bin/python" ]; then
        "$PYTHON" -m venv "$DESTDIR$OPT/.venv" || die "cannot create a venv (apt-get install python3-venv)"
        say "created $OPT/.venv"
    fi
    "$DESTDIR$OPT/.venv/bin/python" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086 # PIP_ARGS holds several words on purpose
    "$DESTDIR$OPT/.venv/bin/python" -m pip install --quiet $PIP_ARGS "$SRC"
    say "installed $("$DESTDIR$OPT/.venv/bin/migraine-node" --version) into $OPT/.venv"
else
    say "skipped the virtual environment (--skip-venv)"
fi
install -m 0644 "$SRC"/docs/*.md "$DESTDIR$OPT/docs/"

# 4. Configuration: never overwrite what an administrator edited.
if [ -e "$DESTDIR$ETC/config.toml" ]; then
    say "kept $ETC/config.toml"
else
    owned "root:$NAME" -m 0640 "$SRC/deploy/config.example.toml" "$DESTDIR$ETC/config.toml"
    say "created $ETC/config.toml from deploy/config.example.toml"
fi
if [ ! -e "$DESTDIR$ETC/environment" ]; then
    tmp=$(mktemp)
    cat >"$tmp" <<'EOF'
# Environment of the migraine-node service (KEY=value lines; mode 0640, root:migraine-node).
# Secrets of DICOMweb destinations go here, named by their credentials_env, e.g.
#   PACS_STOW_TOKEN=...
# and any MIGRAINE_NODE_<SECTION>__<KEY> override of /etc/migraine-node/config.toml.
EOF
    owned "root:$NAME" -m 0640 "$tmp" "$DESTDIR$ETC/environment"
    rm -f "$tmp"
    say "created $ETC/environment"
fi

# 5. The unit.
if [ -e "$DESTDIR$UNIT" ] && cmp -s "$SRC/deploy/$NAME.service" "$DESTDIR$UNIT"; then
    say "unit $UNIT unchanged"
    unit_changed=0
else
    install -m 0644 "$SRC/deploy/$NAME.service" "$DESTDIR$UNIT"
    say "installed $UNIT"
    unit_changed=1
fi
if [ "$STAGED" = 0 ] && [ "$unit_changed" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

BIN=$OPT/.venv/bin/$NAME
cat <<EOF

Next steps:
  1. Edit $ETC/config.toml ([node] ae_title/port/allowed_calling_aets, [storage] database_url,
     [model] checkpoint, [[destinations]]); secrets for DICOMweb destinations go in $ETC/environment.
  2. Check it:                 sudo -u $NAME $BIN config check $ETC/config.toml
  3. Create or upgrade the database schema (after every upgrade too, before the restart):
                               sudo -u $NAME $BIN db upgrade --config $ETC/config.toml
  4. Start it at boot and now: systemctl enable --now $NAME   (after an upgrade: systemctl restart $NAME)
  5. Check it answers:         $BIN echo --config $ETC/config.toml <AE_TITLE>@127.0.0.1:<PORT>
     and watch it:             journalctl -u $NAME -f
EOF
