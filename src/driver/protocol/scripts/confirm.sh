# converge: confirm.sh - $3 = confirm: claims the canary $1/confirm/$2 by renaming it to
# $2.confirmed (atomic: the watchdog cannot fire after it). Then, and for $3 = state, prints the
# confirmation's state: state=pending (canary present, watchdog running), state=watchdog-lost
# (canary present, watchdog gone: killed or the host rebooted), state=confirmed, state=firing
# (the watchdog claimed the canary and is rolling back), state=fired followed by the watchdog's
# record, or state=missing (never armed here, or its files were removed).
set -u
c=$1/confirm
if [ "$3" = confirm ] && mv "$c/$2" "$c/$2.confirmed" 2>/dev/null; then
	echo state=confirmed
	exit 0
fi
# The canary only ever disappears, so this runs at most twice.
while :; do
	if [ -e "$c/$2" ]; then
		state=watchdog-lost
		if [ -e "$c/$2.pid" ]; then
			read -r pid pid_boot < "$c/$2.pid"
			read -r boot < /proc/sys/kernel/random/boot_id
			stat=
			if [ "$pid_boot" = "$boot" ]; then
				read -r stat 2>/dev/null < "/proc/$pid/stat" || stat=
			fi
			case $stat in
			'' | *') Z '*) ;;
			*) state=pending ;;
			esac
		fi
		# Claimed (by the watchdog or a confirm) between the two looks: look again.
		[ -e "$c/$2" ] || continue
		echo "state=$state"
	elif [ -e "$c/$2.confirmed" ]; then
		echo state=confirmed
	elif [ -e "$c/$2.fired" ]; then
		if [ -e "$c/$2.result" ]; then
			echo state=fired
			cat "$c/$2.result"
		else
			echo state=firing
		fi
	else
		echo state=missing
	fi
	exit 0
done
