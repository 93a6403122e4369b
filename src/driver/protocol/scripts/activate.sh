# converge: activate.sh - starts <generation dir $1>/artifact/activate $3 detached (own session,
# stdio on files) so that it outlives this command and the connection that ran it. $2 is the
# generation name, $3 the mode, $4 the attempt id. The attempt writes activations/$4.pid,
# activations/$4.log and, when activate exits, activations/$4.status (its exit code) by rename,
# so a status that exists is whole. activate sees CONVERGE_ROLES, CONVERGE_MODE,
# CONVERGE_GENERATION and CONVERGE_STATE_DIR (the target's state directory). activate.log and activate.status link to the latest attempt.
# Prints "started"; exits 3 when the generation is not complete.
set -u
g=$1
a=$1/activations
if [ ! -e "$g/.complete" ]; then
	echo "generation $2 is not installed" >&2
	exit 3
fi
mkdir -p "$a" || exit 1
: > "$a/$4.log" || exit 1
for f in log status; do
	ln -s "activations/$4.$f" "$g/activate.$f.tmp-$4" || exit 1
	mv -T "$g/activate.$f.tmp-$4" "$g/activate.$f" || exit 1
done
runner='a=$1/activations
read -r b < /proc/sys/kernel/random/boot_id
echo "$$ $b" > "$a/$4.pid.tmp" && mv "$a/$4.pid.tmp" "$a/$4.pid"
if cd "$1/artifact"; then
	CONVERGE_ROLES=$1/roles.json CONVERGE_MODE=$3 CONVERGE_GENERATION=$2 CONVERGE_STATE_DIR=${1%/generations/*} "$1/artifact/activate" "$3" </dev/null >>"$a/$4.log" 2>&1
	c=$?
else
	c=126
fi
echo "$c" > "$a/$4.status.tmp" && mv "$a/$4.status.tmp" "$a/$4.status"'
if command -v setsid >/dev/null 2>&1; then
	setsid sh -c "$runner" converge "$@" </dev/null >/dev/null 2>&1 &
else
	nohup sh -c "$runner" converge "$@" </dev/null >/dev/null 2>&1 &
fi
echo started
