# converge: apply.sh - installs, switches to, activates and waits for a generation in one run,
# each phase only when asked, so a deploy is one round trip. $1 is the state dir; then phases,
# each a word and its arguments:
#   install GEN HASH SOURCE  put generation GEN (artifact hash HASH) in place; the roles document
#                            and the artifact come on stdin (see stream.sh). SOURCE is `stream`
#                            (every file on stdin), `base:OTHER` (`K` entries are taken from
#                            complete generation OTHER) or `same:OTHER` (complete generation
#                            OTHER has the same artifact: used as it is when its roles document
#                            is the same, else its artifact is copied)
#   switch GEN               point current at GEN (`-`: the one installed), in one rename
#   activate GEN MODE ATTEMPT
#                            start GEN's (`-`: the one switched to) `activate MODE` detached as
#                            ATTEMPT, or attach to GEN's activation that is already running, or
#                            to its last one when it ended and still waits for confirmation
#                            (never two at once per state dir)
#   attach GEN ATTEMPT       the activation the next phases are about, without starting it
#   arm PREVIOUS CTICKS ATICKS RB_ATTEMPT MODE
#                            arm the confirmation watchdog (the `watch` phase, detached) for the
#                            attempt started or attached: unless `confirm/ATTEMPT` is claimed
#                            within CTICKS x 100 ms after the activation ended (waited for at
#                            most ATICKS x 100 ms), it re-activates PREVIOUS (`-`: none) in MODE
#                            as RB_ATTEMPT
#   watch ...                the watchdog itself (confirm_watchdog.sh); the last phase
#   wait TICKS               wait up to TICKS x 10 ms for the activation to end
#   kill ATTEMPT GEN         end attempt ATTEMPT of GEN: TERM its process group, KILL it 5 s later
# Prints `converge-step PHASE RESULT` as each phase ends; `wait` prints the activation log's last
# 60 KiB, then `converge-status=CODE`, `running` or `lost` last. Exit codes: 3 a generation is
# not installed, 6 another generation's activation runs, 7 bad stream, 1 anything else.

phase_install() {
	g=$state/generations/$1
	if [ -e "$g/.complete" ]; then
		cat > /dev/null
		generation=$1
		echo "converge-step install present $1"
		return 0
	fi
	mkdir -p "$state/generations" || return 1
	# Anything here is an install that was cut short: start over.
	rm -rf "$g" "$g".partial-* || return 1
	p=$g.partial-$$
	mkdir "$p" "$p/artifact" || return 1
	roles_tmp=$p/roles.json
	case $3 in
	same:*)
		other=${3#same:}
		o=$state/generations/$other
		if [ ! -e "$o/.complete" ]; then
			rm -rf "$p"
			echo "generation $other is not installed" >&2
			return 3
		fi
		read_entries "$p/artifact" "" || return 7
		# A complete generation with the same artifact and roles document is
		# this one already: use it (OTHER first).
		for s in "$o" "$state"/generations/*-"$2"; do
			[ -e "$s/.complete" ] && [ -e "$roles_tmp" ] && cmp -s "$roles_tmp" "$s/roles.json" || continue
			rm -rf "$p"
			generation=${s##*/}
			echo "converge-step install reused $generation"
			return 0
		done
		rmdir "$p/artifact" && cp -a "$o/artifact" "$p/artifact" || return 1
		# Copies are not written by read_bytes: put them on disk before the marker.
		sync -f "$p/artifact" 2>/dev/null || sync
		outcome=copied
		;;
	base:*)
		o=$state/generations/${3#base:}
		if [ ! -e "$o/.complete" ]; then
			echo "generation ${3#base:} is not installed" >&2
			return 3
		fi
		read_entries "$p/artifact" "$o/artifact" || return 7
		outcome=uploaded
		;;
	*)
		read_entries "$p/artifact" "" || return 7
		outcome=uploaded
		;;
	esac
	[ -e "$roles_tmp" ] || : > "$roles_tmp"
	if [ ! -x "$p/artifact/activate" ]; then
		echo "generation $1 has no executable artifact/activate" >&2
		return 1
	fi
	# The marker vouches for the files: they are on disk before it is (read_bytes syncs each file
	# it writes; hard links of `K` entries are files already on disk).
	printf '%s\n' "$2" > "$p/.complete" && mv "$p" "$g" || return 1
	generation=$1
	echo "converge-step install $outcome $1"
}

phase_switch() {
	if [ ! -e "$state/generations/$1/.complete" ]; then
		echo "generation $1 is not installed" >&2
		return 3
	fi
	point "$state/current" "generations/$1" "$$" || return 1
	generation=$1
	echo "converge-step switch ok $1"
}

# The runner of one activation: $1 state, $2 generation, $3 mode, $4 attempt. Records itself,
# runs activate in its own session (so its whole process group can be ended), writes the exit
# code by rename, then releases the state dir's activation lock.
runner='umask 077
s=$1
g=$1/generations/$2
a=$g/activations
read -r b < /proc/sys/kernel/random/boot_id
echo "$$ $b" > "$a/$4.pid.tmp" && mv "$a/$4.pid.tmp" "$a/$4.pid"
printf "%s %s %s %s %s\n" "$2" "$4" "$$" "$b" "$(date +%s)" > "$s/activation/record.tmp" &&
	mv "$s/activation/record.tmp" "$s/activation/record"
printf "%s %s %s\n" "$2" "$4" "$3" > "$s/last-activation.tmp" && mv "$s/last-activation.tmp" "$s/last-activation"
if cd "$g/artifact"; then
	export CONVERGE_ROLES="$g/roles.json" CONVERGE_MODE="$3" CONVERGE_GENERATION="$2" CONVERGE_STATE_DIR="$s"
	if command -v setsid >/dev/null 2>&1; then
		setsid "$g/artifact/activate" "$3" </dev/null >>"$a/$4.log" 2>&1 &
	else
		"$g/artifact/activate" "$3" </dev/null >>"$a/$4.log" 2>&1 &
	fi
	p=$!
	echo "$p" > "$a/$4.pgid"
	wait "$p"
	c=$?
else
	c=126
fi
echo "$c" > "$a/$4.status.tmp" && mv "$a/$4.status.tmp" "$a/$4.status"
rm -rf "$s/activation"'

# activation_lock GEN MODE: takes the state dir's activation lock to start GEN (lock=held), or
# finds GEN's activation to attach to (lock=attached, attempt set): the one running, or the last
# one when it ended and waits for its confirmation. Returns 6 when another generation's runs.
# A deploy takes it before it switches, so a busy state dir is left exactly as it was.
activation_lock() {
	g=$state/generations/$1
	a=$g/activations
	tries=0
	while ! mkdir "$state/activation" 2>/dev/null; do
		record=$(activation_record "$state")
		if [ -n "$record" ]; then
			rgen=${record%% *}
			r=${record#* }
			ratt=${r%% *}
			r=${r#* }
			rpid=${r%% *}
			r=${r#* }
			rboot=${r%% *}
			if alive "$rpid" "$rboot" && [ -e "$state/generations/$rgen/activations/$ratt.status" ] &&
				[ "$tries" -lt 100 ]; then
				# It has ended and is releasing the lock.
				sleep 0.02
				tries=$((tries + 1))
				continue
			fi
			if alive "$rpid" "$rboot"; then
				if [ "$rgen" = "$1" ]; then
					attempt=$ratt
					lock=attached
					return 0
				fi
				echo "generation $rgen is being activated (attempt $ratt)" >&2
				return 6
			fi
		elif [ "$tries" -lt 20 ]; then
			# Another start is between taking the lock and its runner's record.
			sleep 0.05
			tries=$((tries + 1))
			continue
		fi
		# The runner that held the lock is gone without releasing it.
		mv "$state/activation" "$state/activation.stale-$$" 2>/dev/null && rm -rf "$state/activation.stale-$$"
	done
	# The state dir's last activation is this generation's in this mode, it ended and waits for its
	# confirmation (its watchdog's canary is unclaimed, or it succeeded and the generation was
	# never recorded as confirmed): that is the one to confirm, not a second activation of the
	# same generation (a controller that was killed comes back to it). A rollback to an older
	# generation is not that: another generation was activated since.
	last=$(readlink "$g/activate.status" 2>/dev/null) && last=${last#activations/} && last=${last%.status}
	waiting=
	read -r lgen latt lmode < "$state/last-activation" 2>/dev/null || lgen=
	if [ -n "$last" ] && [ -e "$a/$last.status" ] && [ "$lgen $latt $lmode" = "$1 $last $2" ] &&
		[ "$(readlink "$state/current" 2>/dev/null)" = "generations/$1" ]; then
		read -r lcode < "$a/$last.status" 2>/dev/null || lcode=
		if [ -e "$state/confirm/$last" ]; then
			waiting=1
		elif [ "$lcode" = 0 ] && [ "$(readlink "$state/confirmed" 2>/dev/null)" != "generations/$1" ]; then
			waiting=1
		fi
	fi
	if [ -n "$waiting" ]; then
		rm -rf "$state/activation"
		attempt=$last
		lock=attached
		return 0
	fi
	lock=held
}

# release_lock: gives back a lock taken and not handed to a runner.
release_lock() {
	[ "$lock" = held ] && rm -rf "$state/activation"
	lock=
}

phase_activate() {
	g=$state/generations/$1
	a=$g/activations
	if [ ! -e "$g/.complete" ]; then
		release_lock
		echo "generation $1 is not installed" >&2
		return 3
	fi
	if [ -z "$lock" ]; then
		activation_lock "$1" "$2" || return $?
	fi
	if [ "$lock" = attached ]; then
		lock=
		echo "converge-step activate attached $1 $attempt"
		return 0
	fi
	attempt=$3
	mkdir -p "$a" && : > "$a/$3.log" || { release_lock; return 1; }
	for f in log status; do
		point "$g/activate.$f" "activations/$3.$f" "$3" || { release_lock; return 1; }
	done
	if command -v setsid >/dev/null 2>&1; then
		setsid sh -c "$runner" converge-activation "$state" "$1" "$2" "$3" </dev/null >/dev/null 2>&1 &
	else
		nohup sh -c "$runner" converge-activation "$state" "$1" "$2" "$3" </dev/null >/dev/null 2>&1 &
	fi
	i=0
	while [ ! -e "$a/$3.pid" ]; do
		if [ "$i" -ge 500 ]; then
			echo "the activation runner did not start" >&2
			return 1
		fi
		sleep 0.01
		i=$((i + 1))
	done
	lock=
	echo "converge-step activate started $1 $3"
}

phase_arm() {
	c=$state/confirm
	if [ "$1" != - ] && [ ! -e "$state/generations/$1/.complete" ]; then
		echo "generation $1 is not installed" >&2
		return 3
	fi
	if [ "$(readlink "$state/current" 2>/dev/null)" != "generations/$generation" ]; then
		echo "current does not point at generation $generation" >&2
		return 4
	fi
	if [ ! -e "$state/generations/$generation/activations/$attempt.log" ]; then
		echo "activation attempt $attempt of generation $generation does not exist" >&2
		return 5
	fi
	mkdir -p "$c" || return 1
	if [ -e "$c/$attempt" ] || [ -e "$c/$attempt.confirmed" ] || [ -e "$c/$attempt.fired" ]; then
		# Armed for this attempt already (a controller that re-attached).
		read -r rb < "$c/$attempt.rollback" 2>/dev/null || rb=-
		echo "converge-step arm existing $attempt $rb"
		return 0
	fi
	echo "$4" > "$c/$attempt.rollback" || return 1
	: > "$c/$attempt.tmp" && mv "$c/$attempt.tmp" "$c/$attempt" || return 1
	previous=$1
	[ "$previous" = - ] && previous=
	if command -v setsid >/dev/null 2>&1; then
		setsid sh -c "$converge_script" converge-watchdog "$state" watch "$attempt" "$generation" "$previous" "$5" "$2" "$3" "$4" </dev/null >/dev/null 2>&1 &
	else
		nohup sh -c "$converge_script" converge-watchdog "$state" watch "$attempt" "$generation" "$previous" "$5" "$2" "$3" "$4" </dev/null >/dev/null 2>&1 &
	fi
	i=0
	while [ ! -e "$c/$attempt.pid" ]; do
		if [ "$i" -ge 500 ]; then
			echo "the confirmation watchdog did not start" >&2
			return 1
		fi
		sleep 0.01
		i=$((i + 1))
	done
	echo "converge-step arm armed $attempt $4"
}

phase_wait() {
	a=$state/generations/$generation/activations
	read -r boot < /proc/sys/kernel/random/boot_id
	i=0
	while :; do
		if [ -e "$a/$attempt.status" ]; then
			tail -c 61440 "$a/$attempt.log" 2>/dev/null
			read -r code < "$a/$attempt.status"
			printf '\nconverge-status=%s\n' "$code"
			return 0
		fi
		if [ -e "$a/$attempt.pid" ]; then
			read -r pid pid_boot < "$a/$attempt.pid"
			if ! alive "$pid" "$pid_boot"; then
				# The runner writes the status before it exits: look once more.
				[ -e "$a/$attempt.status" ] && continue
				echo converge-status=lost
				return 0
			fi
		elif [ ! -e "$a/$attempt.log" ]; then
			echo converge-status=lost
			return 0
		fi
		if [ "$i" -ge "$1" ]; then
			echo converge-status=running
			return 0
		fi
		if [ "$i" -lt 20 ]; then
			sleep 0.01
			i=$((i + 1))
		else
			sleep 0.05
			i=$((i + 5))
		fi
	done
}

phase_kill() {
	a=$state/generations/$2/activations
	if [ -e "$a/$1.status" ] || [ ! -e "$a/$1.pgid" ]; then
		echo "converge-step kill none"
		return 0
	fi
	read -r pgid < "$a/$1.pgid"
	kill -TERM -"$pgid" 2>/dev/null
	i=0
	while kill -0 -"$pgid" 2>/dev/null; do
		if [ "$i" -ge 50 ]; then
			kill -KILL -"$pgid" 2>/dev/null
			break
		fi
		sleep 0.1
		i=$((i + 1))
	done
	# The runner writes the status once activate is gone.
	i=0
	while [ ! -e "$a/$1.status" ] && [ "$i" -lt 50 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	echo "converge-step kill ended"
}

state=$1
shift
generation=
lock=
attempt=
while [ $# -gt 0 ]; do
	case $1 in
	install)
		# A failed install removes what it wrote: nothing else would (observe and prune skip
		# installs in progress).
		phase_install "$2" "$3" "$4" || {
			c=$?
			rm -rf "$state/generations/$2.partial-$$"
			exit "$c"
		}
		shift 4
		;;
	switch)
		[ "$2" = - ] || generation=$2
		if [ "${3:-}" = activate ]; then
			# Never switch a state dir whose activation lock is not ours to take.
			agen=$4
			[ "$agen" = - ] && agen=$generation
			activation_lock "$agen" "$5" || exit $?
		fi
		phase_switch "$generation" || { c=$?; release_lock; exit "$c"; }
		shift 2
		;;
	activate)
		[ "$2" = - ] || generation=$2
		phase_activate "$generation" "$3" "$4" || exit $?
		shift 4
		;;
	attach)
		generation=$2
		attempt=$3
		shift 3
		;;
	arm)
		phase_arm "$2" "$3" "$4" "$5" "$6" || exit $?
		shift 6
		;;
	watch)
		phase_watch "$state" "$2" "$3" "$4" "$5" "$6" "$7" "$8"
		exit 0
		;;
	wait)
		phase_wait "$2" || exit $?
		shift 2
		;;
	kill)
		phase_kill "$2" "$3" || exit $?
		shift 3
		;;
	*)
		echo "unknown phase $1" >&2
		exit 2
		;;
	esac
done
