# converge: confirm.sh - $2 = confirm: claims the canary $1/confirm/$3 of the activation attempt
# $3 by renaming it to $3.confirmed (atomic: the watchdog cannot fire after it), then records
# generation $4 as confirmed ($1/confirmed -> generations/$4) when current still points at it.
# $2 = record: records generation $4 as confirmed the same way, for an activation no watchdog
# guards. Then, for confirm and for $2 = state, prints the confirmation's state: state=pending
# (canary present, watchdog running), state=watchdog-lost (canary present, watchdog gone: killed
# or the host rebooted), state=confirmed, state=firing (the watchdog claimed the canary and is
# rolling back), state=fired followed by the watchdog's record, or state=missing (never armed
# here, or its files were removed).
c=$1/confirm

confirmed() {
	if [ "$(readlink "$1/current" 2>/dev/null)" = "generations/$2" ]; then
		point "$1/confirmed" "generations/$2" "$$" || exit 1
		echo recorded=1
	else
		echo recorded=0
	fi
}

case $2 in
record)
	confirmed "$1" "$4"
	echo state=confirmed
	exit 0
	;;
confirm)
	if mv "$c/$3" "$c/$3.confirmed" 2>/dev/null; then
		confirmed "$1" "$4"
		echo state=confirmed
		exit 0
	fi
	;;
esac
# The canary only ever disappears, so this runs at most twice.
while :; do
	if [ -e "$c/$3" ]; then
		state=watchdog-lost
		if [ -e "$c/$3.pid" ]; then
			read -r pid pid_boot < "$c/$3.pid"
			alive "$pid" "$pid_boot" && state=pending
		fi
		# Claimed (by the watchdog or a confirm) between the two looks: look again.
		[ -e "$c/$3" ] || continue
		echo "state=$state"
	elif [ -e "$c/$3.confirmed" ]; then
		[ "$2" = confirm ] && confirmed "$1" "$4"
		echo state=confirmed
	elif [ -e "$c/$3.fired" ]; then
		if [ -e "$c/$3.result" ]; then
			echo state=fired
			cat "$c/$3.result"
		else
			echo state=firing
		fi
	else
		echo state=missing
	fi
	exit 0
done
