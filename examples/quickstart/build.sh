#!/bin/sh
# Build of machine/web: converge runs this in the desired-state directory with
#   CONVERGE_MACHINE  the machine's name
#   CONVERGE_ROLES    path of its roles document (JSON)
#   CONVERGE_OUT      an empty directory to fill: the artifact
# The artifact must contain an executable `activate`, run on the target as
# `activate MODE` (switch | boot | test | dry-activate) in the artifact's
# directory, with CONVERGE_STATE_DIR (the target's state directory),
# CONVERGE_GENERATION and CONVERGE_ROLES set.
set -eu
mkdir -p "$CONVERGE_OUT/site"
{
  echo "<h1>$CONVERGE_MACHINE</h1>"
  echo "<pre>"
  cat "$CONVERGE_ROLES"
  echo "</pre>"
} > "$CONVERGE_OUT/site/index.html"
cat > "$CONVERGE_OUT/activate" <<'ACTIVATE'
#!/bin/sh
# Runs in the artifact's directory on the target.
set -eu
here=$(pwd)
state=$CONVERGE_STATE_DIR
case "$1" in
  dry-activate) echo "would serve $here/site"; exit 0 ;;
  boot) exit 0 ;;
esac
ln -sfn "$here/site" "$state/served.tmp"
mv -T "$state/served.tmp" "$state/served"
echo "serving $here/site"
ACTIVATE
chmod +x "$CONVERGE_OUT/activate"
echo "built $CONVERGE_MACHINE"
