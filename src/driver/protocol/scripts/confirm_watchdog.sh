# converge: confirm_watchdog.sh - the confirmation watchdog, started by arm_confirmation.sh with
# its arguments. Waits for activation attempt $4 of generation $3 to end, then up to $7 ticks of
# 100 ms for the canary $1/confirm/$2 to be claimed (renamed away by confirm). If it is still
# there, claims it by renaming it to $2.fired: rename is atomic, so exactly one of confirm and
# the watchdog wins. Then, when current still points at $3, switches current back to $5 (or
# removes it when $5 is empty) and re-activates $5 in mode $6 as attempt $8 with the activate
# script ${10}. Writes $2.result (key=value lines) last, by rename. Each wait for an activation
# to end is bounded by ${11} ticks of 100 ms (the activation timeout): an activation that hangs
# longer counts as ended with "timeout", so the watchdog never waits forever.
set -u
d=$1
c=$d/confirm
r=$c/$2.result
read -r boot < /proc/sys/kernel/random/boot_id
echo "$$ $boot" > "$c/$2.pid.tmp" && mv "$c/$2.pid.tmp" "$c/$2.pid"

# Prints the exit code of attempt $2 in generation dir $1 once it has ended, "lost" when its
# runner is gone without a status, or "timeout" after $4 ticks of 100 ms. Returns 1 early when
# the canary $3 (if given) is claimed meanwhile.
ended() {
	n=0
	while :; do
		if [ -e "$1/activations/$2.status" ]; then
			read -r code < "$1/activations/$2.status"
			echo "$code"
			return 0
		fi
		if [ -e "$1/activations/$2.pid" ]; then
			read -r pid pid_boot < "$1/activations/$2.pid"
			stat=
			if [ "$pid_boot" = "$boot" ]; then
				read -r stat 2>/dev/null < "/proc/$pid/stat" || stat=
			fi
			case $stat in
			'' | *') Z '*)
				[ -e "$1/activations/$2.status" ] && continue
				echo lost
				return 0
				;;
			esac
		fi
		if [ -n "${3:-}" ] && [ ! -e "$3" ]; then
			return 1
		fi
		if [ "$n" -ge "$4" ]; then
			echo timeout
			return 0
		fi
		sleep 0.1
		n=$((n + 1))
	done
}

record() {
	printf '%s\n' "$@" > "$r.tmp" && mv "$r.tmp" "$r"
}

activation=$(ended "$d/generations/$3" "$4" "$c/$2" "${11}") || exit 0
i=0
while [ "$i" -lt "$7" ]; do
	[ -e "$c/$2" ] || exit 0
	sleep 0.1
	i=$((i + 1))
done
mv "$c/$2" "$c/$2.fired" 2>/dev/null || exit 0
fired=$(date +%s)
current=$(readlink "$d/current" 2>/dev/null) || current=
if [ "$current" != "generations/$3" ]; then
	record action=superseded "activation=$activation" "current=$current" "fired=$fired"
	exit 0
fi
if [ -z "$5" ]; then
	if rm -f "$d/current"; then
		record action=current-removed "activation=$activation" "fired=$fired"
	else
		record action=failed "activation=$activation" "reason=could not remove current" "fired=$fired"
	fi
	exit 0
fi
if ! { ln -s "generations/$5" "$d/current.tmp-$2" && mv -T "$d/current.tmp-$2" "$d/current"; }; then
	rm -f "$d/current.tmp-$2"
	record action=failed "activation=$activation" "reason=could not switch current to $5" "fired=$fired"
	exit 0
fi
started=$(sh -c "${10}" converge "$d/generations/$5" "$5" "$6" "$8" 2>&1)
if [ "$started" != started ]; then
	record action=failed "activation=$activation" "reason=could not start activation of $5: $started" "fired=$fired"
	exit 0
fi
code=$(ended "$d/generations/$5" "$8" "" "${11}")
record action=rolled-back "activation=$activation" "previous=$5" "rollback_attempt=$8" "rollback_status=$code" "fired=$fired"
