#!/usr/bin/env bash
# The container image test. Builds the Containerfile's runtime stage around a
# release binary (its `prebuilt` target) with podman, on a Debian bookworm
# base image made here with debootstrap (no container registry is needed),
# runs what it built with the models mounted until /health answers 200 and
# one POST /chat turn succeeds, then stops the server with SIGTERM (it must
# exit 0) and removes everything it made.
#
#   tests/container.sh [BINARY]     BINARY: default $CARGO_TARGET_DIR/release/modelpool
#
# `scripts/test.sh --container` builds the binary and runs this. Needs root
# (debootstrap, chroot, mounts), podman and debootstrap (scripts/setup.sh
# --with-test-tools installs them) and the two default models (scripts/setup.sh).
#
# - The base root file system comes from `debootstrap --variant=minbase
#   bookworm` against the mirror apt is configured with, cached as a tarball
#   in ~/.cache/modelpool/container/ (delete it to make a fresh one), and is
#   imported under the name the Containerfile's BASE_IMAGE names.
# - podman works in a storage of its own under a temporary directory (vfs
#   driver, chroot isolation), so the machine's images are never touched and
#   the test's images and containers go with that directory.
# - The image runs with `podman run` where the machine allows it. Where podman
#   run is refused (sandboxes that forbid setrlimit), the test exports the
#   image's file system (podman create + podman export) and runs the image's
#   entrypoint, command, environment, user and working directory under chroot,
#   in a mount namespace of its own holding /proc and the models
#   (read-only bind mounts that end with the process). It says which it did.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/env.sh

IMAGE="localhost/modelpool:latest"
SUITE="bookworm"
# The Containerfile's default BASE_IMAGE: the imported base takes its name.
BASE_IMAGE="$(sed -n 's/^ARG BASE_IMAGE=//p' Containerfile | head -1)"
BINARY="${1:-$CARGO_TARGET_DIR/release/modelpool}"
CACHE_DIR="$HOME/.cache/modelpool/container"
BASE_TARBALL="$CACHE_DIR/debian-$SUITE-minbase.tar.gz"
CHAT_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
EMBED_FILE="all-MiniLM-L6-v2.Q8_0.gguf"
# Deadlines, seconds: the server's /health after start, one chat turn, the exit after SIGTERM.
HEALTH_DEADLINE=120
CHAT_DEADLINE=120
STOP_DEADLINE=60

started=$SECONDS
say() { printf '[container] %s\n' "$*" >&2; }
die() { printf '[container] FAILED: %s\n' "$*" >&2; exit 1; }

# --- prerequisites -----------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot and mounts); run it as root"
for tool in podman debootstrap unshare chroot curl python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing: scripts/setup.sh --with-test-tools installs podman and debootstrap"
done
[ -n "$BASE_IMAGE" ] || die "Containerfile has no 'ARG BASE_IMAGE=' line"
[ -x "$BINARY" ] || die "no binary at $BINARY: build it with cargo build --release --bin modelpool (scripts/test.sh --container does)"
for f in "$CHAT_FILE" "$EMBED_FILE"; do
  [ -f "$MODELPOOL_MODELS_DIR/$f" ] || die "model $MODELPOOL_MODELS_DIR/$f is missing: run scripts/setup.sh"
done

work="$(mktemp -d "${TMPDIR:-/tmp}/modelpool-container.XXXXXX")"
P=(podman --root "$work/storage" --runroot "$work/runroot" --tmpdir "$work/libpod"
   --storage-driver vfs --cgroup-manager cgroupfs --events-backend file)
server_pid=""
run_name="modelpool-test-$$"
export_name="modelpool-test-export-$$"

cleanup() {
  local rc=$?
  trap - EXIT
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    say "cleanup: stopping the server (pid $server_pid)"
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ -d "$work/storage" ]; then
    say "cleanup: removing the test's containers and images"
    "${P[@]}" rm --force --all >/dev/null 2>&1 || true
    "${P[@]}" rmi --force --all >/dev/null 2>&1 || true
  fi
  # Nothing may be mounted below the directory before it is removed (the
  # chroot's mounts live in the server's own namespace and end with it).
  if grep -qF " $work" /proc/self/mountinfo; then
    say "cleanup: $work still has mounts; left in place: $(grep -F " $work" /proc/self/mountinfo | cut -d' ' -f5 | tr '\n' ' ')"
  else
    rm -rf "$work"
  fi
  say "done in $((SECONDS - started)) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the base image: debootstrap from apt's mirror, cached -------------------
# The first http(s) URI of a `deb` source for SUITE in apt's configuration
# (deb822 .sources files, then one-line .list files).
apt_uri() {
  local suite="$1" f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v suite="$suite" '
      function flush() {
        if (!done && types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && enabled != "no" && uri != "") { print uri; done = 1 }
        types = ""; suites = ""; uri = ""; enabled = ""
      }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]*#/ { next }
      { key = tolower($1); $1 = "" }
      key == "types:" { types = $0 }
      key == "suites:" { suites = $0 }
      key == "enabled:" { enabled = tolower($2) }
      key == "uris:" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { uri = $i; break } }
      END { flush() }' "$f" | sed 's/[[:space:]]*$//' | head -1 | grep . && return 0
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" \
      | awk -v suite="$suite" '$1 == "deb" && $2 ~ /^https?:\/\// && $3 == suite { print $2; exit }' | grep . && return 0
  done
  return 1
}

if [ -s "$BASE_TARBALL" ]; then
  say "base root file system: cached $BASE_TARBALL ($(du -h "$BASE_TARBALL" | cut -f1))"
else
  mirror="$(apt_uri "$SUITE" || echo http://deb.debian.org/debian)"
  security="$(apt_uri "$SUITE-security" || true)"
  say "making the base root file system: debootstrap --variant=minbase $SUITE from $mirror (~1 min, once; cached in $CACHE_DIR)"
  mkdir -p "$CACHE_DIR"
  rootfs="$work/base"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  # apt's sources as in Debian's own images: the release, its updates, and
  # security updates where apt here has a source for them.
  {
    echo "deb $mirror $SUITE main"
    echo "deb $mirror $SUITE-updates main"
    [ -n "$security" ] && echo "deb $security $SUITE-security main"
  } >"$rootfs/etc/apt/sources.list"
  # Slim as Debian's -slim images: no downloaded packages, package lists,
  # documentation or translations, now or from later installs.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  tar --numeric-owner -C "$rootfs" -c . | gzip -1 >"$BASE_TARBALL.part.$$"
  mv "$BASE_TARBALL.part.$$" "$BASE_TARBALL"
  rm -rf "$rootfs"
  say "base root file system cached: $BASE_TARBALL ($(du -h "$BASE_TARBALL" | cut -f1))"
fi

say "importing it as $BASE_IMAGE (podman storage of the test's own in $work/storage)"
"${P[@]}" import --quiet "$BASE_TARBALL" "$BASE_IMAGE" >/dev/null

# --- the image: the runtime stage around the binary --------------------------
say "building $IMAGE: Containerfile target prebuilt around $BINARY ($(du -h "$BINARY" | cut -f1))"
mkdir -p "$work/context"
ln "$BINARY" "$work/context/modelpool" 2>/dev/null || cp "$BINARY" "$work/context/modelpool"
build_started=$SECONDS
"${P[@]}" build --pull=never --isolation chroot --layers=false --format docker \
    --target prebuilt --build-arg BINARY=modelpool --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -f "$ROOT/Containerfile" -t "$IMAGE" "$work/context" >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; die "podman build failed (log above)"; }
say "built $IMAGE in $((SECONDS - build_started)) s ($("${P[@]}" image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"

# What the image says about itself; the runs below use exactly this.
inspect() { "${P[@]}" image inspect --format "$1" "$IMAGE"; }
user="$(inspect '{{.Config.User}}')"
workdir="$(inspect '{{.Config.WorkingDir}}')"
mapfile -t entrypoint < <(inspect '{{range .Config.Entrypoint}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t command < <(inspect '{{range .Config.Cmd}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t image_env < <(inspect '{{range .Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
health_kind="$(inspect '{{with .Config.Healthcheck}}{{index .Test 0}}{{end}}')"
health_cmd="$(inspect '{{with .Config.Healthcheck}}{{index .Test 1}}{{end}}')"
ports="$(inspect '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}')"
say "image: user ${user:-root}, entrypoint ${entrypoint[*]}, command ${command[*]}, ports ${ports% }, HEALTHCHECK ${health_kind} ${health_cmd}"
case "$user" in ""|root|0|0:*|root:*) die "the image runs as root (USER is '${user}')" ;; esac
[ "$health_kind" = "CMD-SHELL" ] && [ -n "$health_cmd" ] || die "the image has no HEALTHCHECK (built without --format docker?)"
[[ " $ports " == *" 8080/tcp "* ]] || die "the image does not expose 8080/tcp (exposes: ${ports:-nothing})"

# --- run it ------------------------------------------------------------------
chat_check() {
  local base="$1" code
  say "sending one chat turn: POST $base/chat"
  code="$(curl -sS -m "$CHAT_DEADLINE" -o "$work/chat.json" -w '%{http_code}' -H 'content-type: application/json' \
    -d '{"message": "Say hello in five words.", "max_tokens": 24, "seed": 7}' "$base/chat")" \
    || die "POST /chat did not answer within ${CHAT_DEADLINE} s"
  [ "$code" = 200 ] || die "POST /chat answered $code: $(head -c 400 "$work/chat.json")"
  python3 - "$work/chat.json" <<'EOF' || die "POST /chat answered 200 with an unexpected body: $(head -c 400 "$work/chat.json")"
import json, sys
body = json.load(open(sys.argv[1]))
assert isinstance(body.get("response"), str) and body["response"].strip(), "empty response"
assert body.get("conversation_id"), "no conversation_id"
assert body.get("finish_reason") in ("stop", "length"), body.get("finish_reason")
assert body["usage"]["completion_tokens"] > 0, "no completion tokens"
print("[container] chat turn answered: %r (%d tokens, finish_reason %s)"
      % (body["response"][:80], body["usage"]["completion_tokens"], body["finish_reason"]), file=sys.stderr)
EOF
}

# Polls GET /health until 200; gives up at the deadline or when alive_check fails.
wait_health() {
  local base="$1" alive_check="$2" deadline=$((SECONDS + HEALTH_DEADLINE)) code=""
  say "waiting for GET $base/health to answer 200 (deadline ${HEALTH_DEADLINE} s)"
  while [ $SECONDS -lt $deadline ]; do
    $alive_check || return 1
    code="$(curl -s -m 5 -o "$work/health.json" -w '%{http_code}' "$base/health" || true)"
    if [ "$code" = 200 ]; then
      say "/health answered 200 after $((SECONDS - run_started)) s (status: $(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("status"))' "$work/health.json" 2>/dev/null))"
      return 0
    fi
    sleep 0.5
  done
  die "/health did not answer 200 within ${HEALTH_DEADLINE} s (last: ${code:-no answer} $(head -c 200 "$work/health.json" 2>/dev/null))"
}

models="$MODELPOOL_MODELS_DIR"
say "trying: podman run $IMAGE with $models mounted read-only at /models"
run_started=$SECONDS
if "${P[@]}" run -d --name "$run_name" -p 127.0.0.1::8080 -v "$models:/models:ro" "$IMAGE" >"$work/run.out" 2>"$work/run.err"; then
  say "RUN MODE: podman run (container $run_name)"
  host_port="$("${P[@]}" port "$run_name" 8080/tcp | head -1 | sed 's/.*://')"
  [ -n "$host_port" ] || die "podman port gave no host port for 8080/tcp"
  base="http://127.0.0.1:$host_port"
  container_running() {
    [ "$("${P[@]}" inspect --format '{{.State.Running}}' "$run_name")" = true ] && return 0
    "${P[@]}" logs "$run_name" 2>&1 | tail -20 >&2
    die "the container exited before /health answered 200 (its log above)"
  }
  wait_health "$base" container_running
  say "running the image's HEALTHCHECK (podman healthcheck run)"
  "${P[@]}" healthcheck run "$run_name" || die "the image's HEALTHCHECK failed while /health answers 200"
  chat_check "$base"
  say "stopping the container (SIGTERM, up to ${STOP_DEADLINE} s)"
  "${P[@]}" stop --time "$STOP_DEADLINE" "$run_name" >/dev/null
  status="$("${P[@]}" inspect --format '{{.State.ExitCode}}' "$run_name")"
  [ "$status" = 0 ] || { "${P[@]}" logs "$run_name" 2>&1 | tail -20 >&2; die "the server exited with status $status after SIGTERM (its log above)"; }
  say "PASSED (podman run): /health 200, one chat turn, clean exit after SIGTERM"
  exit 0
fi

reason="$(grep -v '^time=' "$work/run.err" | tail -1)"
say "podman run is refused here: ${reason:-$(tail -1 "$work/run.err")}"
"${P[@]}" rm --force "$run_name" >/dev/null 2>&1 || true
say "RUN MODE: chroot (podman create + podman export, then the image's entrypoint under chroot)"

tree="$work/rootfs"
mkdir -p "$tree"
"${P[@]}" create --name "$export_name" "$IMAGE" >/dev/null 2>>"$work/podman.err" \
  || { cat "$work/podman.err" >&2; die "podman create failed"; }
"${P[@]}" export "$export_name" 2>>"$work/podman.err" | tar --numeric-owner -x -C "$tree" \
  || { cat "$work/podman.err" >&2; die "podman export failed"; }
"${P[@]}" rm "$export_name" >/dev/null 2>>"$work/podman.err" || true
say "exported the image's file system to $tree ($(du -sh "$tree" | cut -f1))"

# The image's user as numbers, from its own /etc/passwd and /etc/group.
user_name="${user%%:*}" group_name="${user#*:}"
[ "$group_name" = "$user" ] && group_name=""
if [[ "$user_name" =~ ^[0-9]+$ ]]; then uid="$user_name"; gid="$user_name"
else
  uid="$(awk -F: -v u="$user_name" '$1 == u { print $3 }' "$tree/etc/passwd")"
  gid="$(awk -F: -v u="$user_name" '$1 == u { print $4 }' "$tree/etc/passwd")"
fi
if [ -n "$group_name" ]; then
  if [[ "$group_name" =~ ^[0-9]+$ ]]; then gid="$group_name"
  else gid="$(awk -F: -v g="$group_name" '$1 == g { print $3 }' "$tree/etc/group")"; fi
fi
[ -n "$uid" ] && [ -n "$gid" ] || die "user '$user' is not in the image's /etc/passwd"
[ -d "$tree/models" ] || die "the image has no /models to mount the models on"

# A port chosen by the OS for the server's bind (the image binds 0.0.0.0:8080;
# this run shares the machine's network, so it takes a free loopback port
# through the same setting, and the HEALTHCHECK follows it).
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
run_env=("${image_env[@]}" "MODELPOOL_SERVER_BIND=127.0.0.1:$port")
base="http://127.0.0.1:$port"

say "starting ${entrypoint[*]} ${command[*]} under chroot as uid $uid gid $gid in ${workdir:-/}, MODELPOOL_SERVER_BIND=127.0.0.1:$port, $models bound read-only on /models"
# unshare: a mount namespace of the server's own (its mounts end with it);
# every step execs the next, so $! is the server's pid.
unshare --mount --propagation private -- /bin/sh -c '
  tree="$1" models="$2" ids="$3" dir="$4"; shift 4
  mount -t proc proc "$tree/proc" || exit 125
  mount --bind "$models" "$tree/models" && mount -o remount,bind,ro "$tree/models" || exit 125
  exec chroot --userspec="$ids" --groups="${ids#*:}" "$tree" /usr/bin/env -i -C "$dir" "$@"
' sh "$tree" "$models" "$uid:$gid" "${workdir:-/}" "${run_env[@]}" "${entrypoint[@]}" "${command[@]}" \
  >"$work/server.log" 2>&1 &
server_pid=$!
run_started=$SECONDS
server_alive() {
  kill -0 "$server_pid" 2>/dev/null && return 0
  local status=0; wait "$server_pid" || status=$?; server_pid=""
  tail -20 "$work/server.log" >&2
  die "the server exited (status $status) before /health answered 200 (its log above)"
}
wait_health "$base" server_alive
running_uid="$(awk '/^Uid:/ { print $2 }' "/proc/$server_pid/status")"
[ "$running_uid" = "$uid" ] || die "the server runs as uid $running_uid, the image's user is $uid"
say "the server runs as the image's user (uid $running_uid)"

say "running the image's HEALTHCHECK inside the image: $health_cmd"
chroot --userspec="$uid:$gid" --groups="$gid" "$tree" /usr/bin/env -i "${run_env[@]}" /bin/sh -c "$health_cmd" \
  || die "the image's HEALTHCHECK failed while /health answers 200"

chat_check "$base"

say "stopping the server (SIGTERM, up to ${STOP_DEADLINE} s)"
kill -TERM "$server_pid"
for _ in $(seq 1 $((STOP_DEADLINE * 2))); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
kill -0 "$server_pid" 2>/dev/null && die "the server did not exit within ${STOP_DEADLINE} s of SIGTERM"
status=0; wait "$server_pid" || status=$?; server_pid=""
[ "$status" = 0 ] || { tail -20 "$work/server.log" >&2; die "the server exited with status $status after SIGTERM (its log above)"; }
say "PASSED (chroot run of the exported image): /health 200, the HEALTHCHECK, one chat turn, exit 0 after SIGTERM"
