# converge: install.sh - puts generation $3 (artifact hash $4) in place under state dir $2.
# $1 is the phase: prepare or finish. $5 says how the roles document comes: inline (it is $6)
# or staged (uploaded to <generation>/.roles-staged/roles.json before finish).
# prepare prints one word: present (already complete), installed (copied from a complete
# generation with the same hash and finished), copied (copied, finish still to run) or upload
# (the caller must upload the artifact to <generation>/artifact, then run finish).
# finish writes roles.json, flushes, and writes the .complete marker last.
set -u
g=$2/generations/$3

finish() {
	if [ "$5" = inline ]; then
		printf '%s' "$6" > "$g/roles.json.tmp" || return 1
	else
		mv "$g/.roles-staged/roles.json" "$g/roles.json.tmp" || return 1
		rm -rf "$g/.roles-staged"
	fi
	mv "$g/roles.json.tmp" "$g/roles.json" || return 1
	if [ ! -d "$g/artifact" ]; then
		echo "$g/artifact is missing" >&2
		return 1
	fi
	# The marker vouches for the files: they must be on disk before it is.
	sync -f "$g/roles.json" 2>/dev/null || sync
	printf '%s\n' "$4" > "$g/.complete.tmp" && mv "$g/.complete.tmp" "$g/.complete"
}

case $1 in
prepare)
	if [ -e "$g/.complete" ]; then
		echo present
		exit 0
	fi
	mkdir -p "$2/generations" || exit 1
	# Anything here is an install that was cut short: start over.
	rm -rf "$g" && mkdir "$g" || exit 1
	for o in "$2"/generations/*-"$4"; do
		[ "$o" != "$g" ] && [ -e "$o/.complete" ] && [ -d "$o/artifact" ] || continue
		cp -a "$o/artifact" "$g/artifact.partial" && mv "$g/artifact.partial" "$g/artifact" || exit 1
		if [ "$5" = inline ]; then
			finish "$@" || exit 1
			echo installed
		else
			echo copied
		fi
		exit 0
	done
	echo upload
	;;
finish)
	finish "$@" || exit 1
	;;
*)
	echo "unknown phase $1" >&2
	exit 2
	;;
esac
