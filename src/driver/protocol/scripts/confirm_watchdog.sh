# converge: confirm_watchdog.sh - the confirmation watchdog: apply.sh's `watch` phase, which its
# `arm` phase starts detached (a new shell running apply.sh's own text). phase_watch's $1 state
# dir, $2 the activation attempt (its canary is $1/confirm/$2), $3 its generation, $4 the
# generation to roll back to (empty: none), $5 the mode, $6 the confirmation window in ticks of
# 100 ms, $7 the activation timeout in ticks of 100 ms, $8 the rollback's attempt id. Waits for
# the activation to end (at most $7 ticks: one that hangs longer is ended, its process group
# TERMed then KILLed), then up to $6 ticks for the canary to be claimed (renamed away by
# confirm). If it is still there, claims it by renaming it to $2.fired: rename is atomic, so
# exactly one of confirm and the watchdog wins. Then, when current still points at $3, switches
# current back to $4 (or removes it when $4 is empty) and re-activates $4 in mode $5 as attempt
# $8. Writes $2.result (key=value lines) last, by rename. It runs in a process of its own: it
# exits when done.

# ended GENERATION ATTEMPT CANARY TICKS: prints the exit code of the attempt once it has ended,
# "lost" when its runner is gone without a status, or "timeout" after TICKS ticks of 100 ms.
# Returns 1 early when CANARY (if given) is claimed meanwhile.
ended() {
	n=0
	a=$state/generations/$1/activations
	while :; do
		if [ -e "$a/$2.status" ]; then
			read -r code < "$a/$2.status"
			echo "$code"
			return 0
		fi
		if [ -e "$a/$2.pid" ]; then
			read -r pid pid_boot < "$a/$2.pid"
			if ! alive "$pid" "$pid_boot"; then
				[ -e "$a/$2.status" ] && continue
				echo lost
				return 0
			fi
		fi
		if [ -n "$3" ] && [ ! -e "$3" ]; then
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

phase_watch() {
	c=$1/confirm
	r=$c/$2.result
	read -r boot < /proc/sys/kernel/random/boot_id
	echo "$$ $boot" > "$c/$2.pid.tmp" && mv "$c/$2.pid.tmp" "$c/$2.pid"

	d=$1
	activation=$(ended "$3" "$2" "$c/$2" "$7") || exit 0
	if [ "$activation" = timeout ]; then
		(phase_kill "$2" "$3") >/dev/null 2>&1
	fi
	i=0
	while [ "$i" -lt "$6" ]; do
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
	if [ -z "$4" ]; then
		if rm -f "$d/current"; then
			record action=current-removed "activation=$activation" "fired=$fired"
		else
			record action=failed "activation=$activation" "reason=could not remove current" "fired=$fired"
		fi
		exit 0
	fi
	if ! point "$d/current" "generations/$4" "$2"; then
		record action=failed "activation=$activation" "reason=could not switch current to $4" "fired=$fired"
		exit 0
	fi
	started=$(phase_activate "$4" "$5" "$8" 2>&1)
	case $started in
	"converge-step activate "*) ;;
	*)
		record action=failed "activation=$activation" "reason=could not start activation of $4: $started" "fired=$fired"
		exit 0
		;;
	esac
	code=$(ended "$4" "$8" "" "$7")
	record action=rolled-back "activation=$activation" "previous=$4" "rollback_attempt=$8" "rollback_status=$code" "fired=$fired"
}
