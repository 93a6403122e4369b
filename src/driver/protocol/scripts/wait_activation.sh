# converge: wait_activation.sh - waits up to $3 ticks of 10 ms for activation attempt $2 in
# generation dir $1 to end, looking every 10 ms for the first 200 ms, then every 50 ms. Prints the last 60 KiB of its log and then, as the last line,
# converge-status=<exit code>; or only converge-status=running when it still runs, or
# converge-status=lost when its runner is gone (killed, or the host rebooted) without a status.
set -u
a=$1/activations
read -r boot < /proc/sys/kernel/random/boot_id
i=0
while :; do
	if [ -e "$a/$2.status" ]; then
		tail -c 61440 "$a/$2.log" 2>/dev/null
		read -r code < "$a/$2.status"
		printf '\nconverge-status=%s\n' "$code"
		exit 0
	fi
	if [ -e "$a/$2.pid" ]; then
		read -r pid pid_boot < "$a/$2.pid"
		stat=
		if [ "$pid_boot" = "$boot" ]; then
			read -r stat 2>/dev/null < "/proc/$pid/stat" || stat=
		fi
		case $stat in
		'' | *') Z '*)
			# The runner writes the status before it exits: look once more.
			[ -e "$a/$2.status" ] && continue
			echo converge-status=lost
			exit 0
			;;
		esac
	elif [ ! -e "$a/$2.log" ]; then
		echo converge-status=lost
		exit 0
	fi
	if [ "$i" -ge "$3" ]; then
		echo converge-status=running
		exit 0
	fi
	if [ "$i" -lt 20 ]; then
		sleep 0.01
		i=$((i + 1))
	else
		sleep 0.05
		i=$((i + 5))
	fi
done
