#!/bin/sh
# shiftgate-upgrade.sh: replace the shiftgate that shiftgate.service runs by the binary now at
# /usr/local/bin/shiftgate, without closing the listening socket (Pingora's graceful upgrade).
#
#   install -m 0755 ./shiftgate /usr/local/bin/shiftgate   # a rename: the running process keeps
#                                                          # its own copy of the old file
#   /usr/local/sbin/shiftgate-upgrade.sh                    # as root
#
# `systemctl restart shiftgate` is the simple alternative: it drains the old process first
# (SIGTERM, up to shutdown.drain_timeout), and the port is closed until the new one listens.
#
# The upgrade: the new process is started with `run --upgrade`; it binds the admin port next to
# the old one (SO_REUSEPORT), then waits (about 6 s) on the upgrade socket. SIGQUIT to the old
# process makes it hand its listening sockets over through that socket, finish the requests it
# holds (those already waiting are still paced by it) and exit.
#
# Keeping systemd in charge: systemd only knows the old process. So the new one is started in
# the unit's control group, as the unit's user, inside the old process's mount namespace
# (ProtectSystem=, ProtectHome=, PrivateTmp=, ReadWritePaths=), with the old process's
# environment (EnvironmentFile=: SHIFTGATE_ADMIN_TOKEN), the unit's open-files limit
# (LimitNOFILE=; this shell's would be 1,024), no capabilities, no new privileges, and
# its output in the journal of the unit. Once it has taken the sockets over it tells systemd
# READY=1 and MAINPID=<its pid> through $NOTIFY_SOCKET (carried over with the environment; the
# unit's NotifyAccess=all accepts it), and systemd makes it the main process at once. As a
# fallback its PID also goes into the unit's PIDFile= before the old process is told to go:
# systemd re-reads PIDFile= when the main process exits. Either way `systemctl
# status|reload|stop` keep working. Not carried over until the next
# `systemctl restart`: the seccomp and namespace filters (SystemCallFilter=,
# RestrictAddressFamilies=, RestrictNamespaces=, MemoryDenyWriteExecute=...).
#
# Readiness is the upgrade socket, not /healthz: while both processes hold the admin port,
# either may answer /healthz. The socket appears once the new process has loaded its config and
# bound its admin port; it is removed first, so a stale one cannot look like readiness.

set -eu

# Keep these in step with shiftgate.service (ExecStart=, PIDFile=, User=).
UNIT=shiftgate.service
BIN=/usr/local/bin/shiftgate
CONFIG=/etc/shiftgate/config.yaml
SOCK=/run/shiftgate/upgrade.sock
PIDFILE=/run/shiftgate/shiftgate.pid
RUN_AS=shiftgate
CGROUP_ROOT=/sys/fs/cgroup
# How long the old process may take to finish what it holds (queue.max_wait + retries).
OLD_EXIT_WAIT=120

say() { printf 'shiftgate-upgrade: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
alive() { kill -0 "$1" 2>/dev/null; }

[ "$(id -u)" -eq 0 ] || die "run me as root"
NSENTER=$(command -v nsenter) || die "nsenter (util-linux) not found"
SETPRIV=$(command -v setpriv) || die "setpriv (util-linux) not found"
SETSID=$(command -v setsid) || die "setsid (util-linux) not found"
SYSTEMD_CAT=$(command -v systemd-cat) || die "systemd-cat not found"

# 1. The old process and the unit's control group, from systemd (its MainPID, which the
#    process itself announced with MAINPID=).
old=$(systemctl show -p MainPID --value "$UNIT")
# shellcheck disable=SC2015 # die when either test fails
[ "${old:-0}" -gt 0 ] && alive "$old" || die "$UNIT is not running: use systemctl start"
cgroup=$(systemctl show -p ControlGroup --value "$UNIT")
procs=$CGROUP_ROOT$cgroup/cgroup.procs                 # cgroup v2
[ -e "$procs" ] || procs=$CGROUP_ROOT/systemd$cgroup/cgroup.procs   # cgroup v1
# shellcheck disable=SC2015
[ -n "$cgroup" ] && [ -e "$procs" ] || die "control group of $UNIT not found"

# The unit's open-files limit (LimitNOFILE=, soft and hard): the new process must not inherit
# this shell's (often 1,024: one client connection too many and it refuses the next).
nofile=$(systemctl show -p LimitNOFILE --value "$UNIT")
case $nofile in
'' | *[!0-9]*) die "LimitNOFILE of $UNIT is not a number: $nofile" ;;
esac

# 2. The environment systemd gave the old process, one VAR=value per argument of `env -i`
#    (values spanning several lines are not supported); NOTIFY_SOCKET among it, so the new
#    process can tell systemd it is ready and the main one. JOURNAL_STREAM is left out: it
#    described the old process's stderr; systemd-cat sets up a new one.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tr '\0' '\n' <"/proc/$old/environ" >"$tmp/environ"
set --
while IFS= read -r var; do
    case $var in
    JOURNAL_STREAM=*) ;;
    *) set -- "$@" "$var" ;;
    esac
done <"$tmp/environ"

# 3. The new binary must accept the config (it would refuse to start otherwise), in that
#    environment: the admin token's variable (admin_token_env) is there, not in this shell.
env -i "$@" "$BIN" check --config "$CONFIG" >/dev/null || die "$BIN rejects $CONFIG: nothing changed"

# 4. Start the new process in a session of its own (it outlives this script, no terminal signal
#    reaches it). Every step execs the next, so the PID that sh writes is shiftgate's:
#      sh           joins the unit's control group, tells us its PID, takes the unit's
#                   open-files limit (`ulimit -n` sets soft and hard at once, in either
#                   direction; root may raise it);
#      nsenter      enters the old process's mount namespace (the unit's file system view);
#      setpriv      becomes the unit's user, without capabilities or new privileges;
#      systemd-cat  sends stdout/stderr to the journal (journalctl -u shiftgate);
#      shiftgate    run --upgrade with the arguments of ExecStart=.
rm -f "$SOCK"
# shellcheck disable=SC2016 # $$, $1... belong to the inner sh
"$SETSID" -f env -i "$@" /bin/sh -c '
    echo $$ >"$1" && echo $$ >"$2" && ulimit -n "$3" && cd / || exit 1
    shift 3
    exec "$@"' sh "$procs" "$tmp/new.pid" "$nofile" \
    "$NSENTER" --target "$old" --mount -- \
    "$SETPRIV" --reuid="$RUN_AS" --regid="$RUN_AS" --init-groups \
    --inh-caps=-all --bounding-set=-all --no-new-privs -- \
    "$SYSTEMD_CAT" --identifier=shiftgate -- \
    "$BIN" run --config "$CONFIG" --upgrade --upgrade-sock "$SOCK" --pid-file "$PIDFILE" \
    </dev/null

# 5. Wait (up to 10 s) until the new process has created the upgrade socket.
new=
i=0
while :; do
    [ -n "$new" ] || new=$(cat "$tmp/new.pid" 2>/dev/null || true)
    [ -n "$new" ] && [ -S "$SOCK" ] && alive "$new" && break
    if [ -n "$new" ] && ! alive "$new"; then
        die "the new process exited (journalctl -u $UNIT): the old one ($old) keeps serving"
    fi
    i=$((i + 1))
    if [ "$i" -gt 10 ]; then
        [ -z "$new" ] || kill -TERM "$new" 2>/dev/null || true
        die "the new process did not get ready in 10 s: stopped it; the old one ($old) keeps serving"
    fi
    sleep 1
done

# 6. Tell systemd which process comes next (the fallback: the new process also says so itself,
#    MAINPID=, once it has the sockets), then hand the sockets over.
printf '%s\n' "$new" >"$PIDFILE"
kill -QUIT "$old"
say "new process $new is taking over; old process $old finishes what it holds"

# 7. Wait for the old process to exit, then check that systemd follows the new one.
i=0
while alive "$old"; do
    i=$((i + 1))
    if [ "$i" -gt "$OLD_EXIT_WAIT" ]; then
        say "old process $old still running after ${OLD_EXIT_WAIT} s (still answering?);"
        die "systemd adopts $new when it exits: check with systemctl status $UNIT"
    fi
    sleep 1
done
main=$(systemctl show -p MainPID --value "$UNIT")
if [ "$main" = "$new" ] && alive "$new"; then
    say "done: $UNIT runs $new ($("$BIN" --version))"
elif alive "$new"; then
    # It serves, but unsupervised; a fresh start would find the port taken.
    die "$new serves but systemd lost track of it (MainPID=$main): at a quiet time," \
        "kill -TERM $new, wait for it to exit, then systemctl restart $UNIT"
else
    say "the new process is gone (journalctl -u $UNIT): restarting $UNIT"
    systemctl restart "$UNIT"
    exit 1
fi
