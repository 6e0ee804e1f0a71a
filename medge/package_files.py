"""The two text files of a device package: the systemd unit and install.sh (docs/device.md).

``@OPT@``, ``@ETC@``, ``@STATE@`` and ``@USER@`` in the unit are filled in by install.sh;
``@EXTRAS@`` in install.sh by the package builder (the extras the config needs, e.g.
``device`` or ``device,device-video``).
"""

from __future__ import annotations

__all__ = ["INSTALL_SH", "SYSTEMD_UNIT"]

SYSTEMD_UNIT = """\
# medge edge agent; written by 'medge agent package', paths filled in by install.sh
[Unit]
Description=medge edge agent
Documentation=https://github.com/medge/medge/blob/main/docs/device.md
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
Type=exec
User=@USER@
Group=@USER@
ExecStart=@OPT@/venv/bin/medge agent run --config @ETC@/agent.yaml
Restart=always
RestartSec=5
# the agent waits up to 10 s for the gateway's acks on SIGTERM (the rest stays in the outbox)
TimeoutStopSec=30
# the outbox and the bundles (current, previous, over-the-air updates) live here
StateDirectory=medge-agent
StateDirectoryMode=0700
ReadWritePaths=-@STATE@
WorkingDirectory=-@STATE@
UMask=0077
# hardening: read-only system, no privileges, no new privileges
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
NoNewPrivileges=true
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallArchitectures=native
SystemCallFilter=@system-service
# no PrivateDevices: cameras (/dev/video*) and serial sensors are device nodes; give access
# with a drop-in: SupplementaryGroups=video dialout

[Install]
WantedBy=multi-user.target
"""

INSTALL_SH = r"""#!/bin/sh
# Install the medge edge agent from this package, with no network access.
#   sudo ./install.sh                        /opt, /etc, /var/lib/medge-agent; systemd unit on
#   ./install.sh --prefix DIR --no-systemd   everything under DIR, no user, no unit enabled
set -eu
PREFIX=""
SYSTEMD=1
AGENT_USER=medge
PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --prefix=*) PREFIX=${1#--prefix=}; shift ;;
    --no-systemd) SYSTEMD=0; shift ;;
    --python) PYTHON=$2; shift 2 ;;
    --user) AGENT_USER=$2; shift 2 ;;
    -h|--help) sed -n 2,4p "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -n "$PREFIX" ]; then
  mkdir -p "$PREFIX"
  PREFIX=$(cd "$PREFIX" && pwd)
fi
OPT=$PREFIX/opt/medge-agent
ETC=$PREFIX/etc/medge-agent
STATE=$PREFIX/var/lib/medge-agent
umask 022
mkdir -p "$OPT" "$ETC" "$STATE/bundles"
chmod 700 "$STATE"

echo "medge: creating $OPT/venv from the shipped wheels (no index): medge[@EXTRAS@]"
"$PYTHON" -m venv --clear "$OPT/venv"
"$OPT/venv/bin/python" -m pip install -q --disable-pip-version-check --no-index \
  --find-links "$HERE/wheels" 'medge[@EXTRAS@]'

# the identity: the device key stays mode 0600 (the agent refuses it otherwise)
rm -rf "$ETC/identity"
cp -Rp "$HERE/identity" "$ETC/identity"
chmod 700 "$ETC/identity"
find "$ETC/identity" -name '*.key' -exec chmod 600 {} +

# the bundle: bundles/<name>, and 'bundle' a link to the current one (over-the-air updates
# add bundles/<hash> beside it and move the link; the previous one is kept for rollback)
for b in "$HERE"/bundle/*/; do
  name=$(basename "$b")
  rm -rf "$STATE/bundles/$name"
  cp -Rp "$b" "$STATE/bundles/$name"
  ln -sfn "bundles/$name" "$STATE/bundle"
done

[ -f "$ETC/agent.yaml" ] && cp -p "$ETC/agent.yaml" "$ETC/agent.yaml.bak"
"$OPT/venv/bin/python" - "$HERE/agent.yaml" "$ETC/agent.yaml" "$ETC" "$STATE" <<'PY'
import sys

import yaml

src, dst, etc, state = sys.argv[1:]
with open(src, encoding="utf-8") as f:
    cfg = yaml.safe_load(f)
cfg["bundle"] = state + "/bundle"
cfg["identity"] = etc + "/identity"
cfg["outbox"]["path"] = state + "/outbox.sqlite"
with open(dst, "w", encoding="utf-8") as f:
    f.write("# written by install.sh from the package's agent.yaml (docs/config.md)\n")
    yaml.safe_dump(cfg, f, sort_keys=False)
PY
chmod 640 "$ETC/agent.yaml"
"$OPT/venv/bin/medge" agent check-config "$ETC/agent.yaml"

sed -e "s|@OPT@|$OPT|g" -e "s|@ETC@|$ETC|g" -e "s|@STATE@|$STATE|g" \
    -e "s|@USER@|$AGENT_USER|g" "$HERE/medge-agent.service" > "$OPT/medge-agent.service"
if [ "$SYSTEMD" = 1 ]; then
  id -u "$AGENT_USER" >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
    --home-dir "$STATE" --shell /usr/sbin/nologin "$AGENT_USER"
  chown -R "$AGENT_USER:$AGENT_USER" "$STATE" "$ETC/identity"
  chgrp "$AGENT_USER" "$ETC/agent.yaml"
  install -m 0644 "$OPT/medge-agent.service" /etc/systemd/system/medge-agent.service
  systemctl daemon-reload
  systemctl enable --now medge-agent.service
  echo "medge: agent enabled; logs: journalctl -u medge-agent -f"
else
  echo "medge: installed under ${PREFIX:-/}; unit written to $OPT/medge-agent.service (not enabled)"
fi
"""
