#!/bin/sh
# Build for the homelab's command-built machines: the artifact carries the
# roles document and an activate script that installs it.
set -eu
cp "$CONVERGE_ROLES" "$CONVERGE_OUT/roles.json"
cat > "$CONVERGE_OUT/activate" <<'ACTIVATE'
#!/bin/sh
set -eu
echo "activating $(dirname "$0") in mode $1"
ACTIVATE
chmod +x "$CONVERGE_OUT/activate"
