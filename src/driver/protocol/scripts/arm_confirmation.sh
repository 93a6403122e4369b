# converge: arm_confirmation.sh - arms the confirmation watchdog for activation attempt $4 of
# generation $3 under state dir $1: creates the canary $1/confirm/$2 and starts the watchdog
# script $9 detached (own session, stdio on /dev/null) with this script's arguments, so it
# outlives the connection. $5 is the generation to roll back to (empty: none), $6 the activation
# mode, $7 the confirmation window in ticks of 100 ms, $8 the id of the rollback's activation
# attempt, ${10} the activate script the watchdog re-activates with, ${11} the activation timeout
# in ticks of 100 ms (bounding the watchdog's waits). Prints "armed" once the
# watchdog has recorded its pid. Exits 3 when a generation is not installed, 4 when current does
# not point at generation $3, 5 when the activation attempt does not exist.
set -u
d=$1
c=$d/confirm
g=$d/generations/$3
if [ ! -e "$g/.complete" ]; then
	echo "generation $3 is not installed" >&2
	exit 3
fi
if [ -n "$5" ] && [ ! -e "$d/generations/$5/.complete" ]; then
	echo "generation $5 is not installed" >&2
	exit 3
fi
if [ "$(readlink "$d/current" 2>/dev/null)" != "generations/$3" ]; then
	echo "current does not point at generation $3" >&2
	exit 4
fi
if [ ! -e "$g/activations/$4.log" ]; then
	echo "activation attempt $4 of generation $3 does not exist" >&2
	exit 5
fi
mkdir -p "$c" || exit 1
: > "$c/$2.tmp" && mv "$c/$2.tmp" "$c/$2" || exit 1
if command -v setsid >/dev/null 2>&1; then
	setsid sh -c "$9" converge-watchdog "$@" </dev/null >/dev/null 2>&1 &
else
	nohup sh -c "$9" converge-watchdog "$@" </dev/null >/dev/null 2>&1 &
fi
i=0
while [ ! -e "$c/$2.pid" ]; do
	if [ "$i" -ge 500 ]; then
		echo "the confirmation watchdog did not start" >&2
		exit 1
	fi
	sleep 0.01
	i=$((i + 1))
done
echo armed
