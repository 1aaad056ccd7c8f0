#!/usr/bin/env bash
# Build and smoke-test the gateway and CPU worker images without a Docker engine.
#
#   tools/images.sh build   buildah builds docker/gateway.Dockerfile and
#                           docker/worker-cpu.Dockerfile (as root, chroot isolation,
#                           --pull=never). A base image that is not in local storage is
#                           pulled; if no registry answers, a local stand-in is made:
#                           Debian bookworm (debootstrap) with a CPython 3.11 >= 3.11.3 in
#                           /usr/local, imported under the FROM line's exact name.
#   tools/images.sh smoke   starts Valkey on 127.0.0.1, runs the built worker and gateway
#                           with `buildah run` (model repository mounted at /models) and
#                           sends a real Embed and Classify through them; stops all after.
#   tools/images.sh sizes   lists the built images and their sizes.
#
# Used by `make images` and `make images-smoke`. Environment:
#   IMAGE_TAG        tag of the built images (default: dev)
#   STANDIN_PYTHON   prefix of the CPython copied into the stand-in base
#                    (default: the base prefix of python3.11 on PATH)
#   STANDIN_ONLY=1   make the stand-in without trying a registry first
#   DEBIAN_MIRROR    mirror for debootstrap (default: the first one in apt's sources)
#   IMAGES_WORK      scratch folder (default: /var/tmp/taskmux-images)
#   MODEL_REPO       model repository mounted into the worker (smoke; default: model-repo)
#   CLIENT_PYTHON    Python with taskmux_client, for the smoke calls (default: .venv/bin/python)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE_TAG=${IMAGE_TAG:-dev}
WORK=${IMAGES_WORK:-/var/tmp/taskmux-images}
IMAGES=(gateway worker-cpu)
# redis 8 imports async_timeout (not in the images) on Python below 3.11.3.
MIN_PYTHON=3.11.3

log() { printf 'images: %s\n' "$*" >&2; }
die() {
	log "$*"
	exit 1
}

image_name() { echo "localhost/taskmux-$1:${IMAGE_TAG}"; }

# The base images the Dockerfiles name (stage aliases left out), one per line.
bases() {
	local file
	for file in "$@"; do
		awk 'toupper($1) == "FROM" {
			image = ""
			for (i = 2; i <= NF; i++) if ($i !~ /^--/) { image = $i; break }
			for (i = 2; i < NF; i++) if (tolower($i) == "as") aliases[$(i + 1)] = 1
			if (!(image in aliases)) print image
		}' "$file"
	done | sort -u
}

require_root_tools() {
	[[ $(id -u) == 0 ]] || die "run as root (buildah with chroot isolation)"
	local tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null || die "$tool not found: apt-get install buildah podman debootstrap"
	done
}

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# "python:3.11.14-slim-bookworm" -> "3.11.14"; nothing for any other image.
python_version_of() { sed -nE 's#^(docker\.io/(library/)?)?python:([0-9]+\.[0-9]+\.[0-9]+)-slim-bookworm$#\3#p' <<<"$1"; }

# The stand-in for python:X.Y.Z-slim-bookworm: what that image is (Debian bookworm, CPython
# built into /usr/local), from a CPython already on this machine.
make_standin() {
	local name=$1 promised prefix version rootfs mirror
	promised=$(python_version_of "$name")
	[[ -n $promised ]] || die "no registry answered for $name, and only python:X.Y.Z-slim-bookworm can be made locally"
	prefix=${STANDIN_PYTHON:-$(python3.11 -c 'import sys; print(sys.base_prefix)')}
	version=$("$prefix/bin/python3.11" -c 'import platform; print(platform.python_version())')
	"$prefix/bin/python3.11" -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON//./, }))" ||
		die "$prefix has Python $version; the images need $MIN_PYTHON or newer (redis 8)"
	[[ $version == "$promised" ]] ||
		log "WARNING: $name promises Python $promised; the stand-in has $version (the newest CPython 3.11 here)"
	mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
		/etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true)}
	mirror=${mirror:-http://deb.debian.org/debian}
	rootfs=$WORK/rootfs-bookworm
	rm -rf "$rootfs"
	mkdir -p "$WORK/debs"
	log "debootstrap bookworm from $mirror into $rootfs"
	# What the official slim image has, and the libraries CPython's extension modules load.
	debootstrap --variant=minbase \
		--include=ca-certificates,netbase,tzdata,libssl3,libffi8,libsqlite3-0,libbz2-1.0,liblzma5,libreadline8,libncursesw6,zlib1g,libuuid1,libexpat1,libtirpc3 \
		--cache-dir="$WORK/debs" bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
		die "debootstrap failed: see $WORK/debootstrap.log"
	log "copying CPython $version from $prefix to /usr/local"
	mkdir -p "$rootfs/usr/local/lib"
	cp -a "$prefix/lib/libpython3"* "$rootfs/usr/local/lib/"
	tar -C "$prefix/lib" --exclude='python3.11/test' --exclude='python3.11/site-packages/*' \
		--exclude='python3.11/idlelib' --exclude='python3.11/tkinter' -cf - python3.11 |
		tar -C "$rootfs/usr/local/lib" -xf -
	install -m 0755 "$prefix/bin/python3.11" "$rootfs/usr/local/bin/python3.11"
	ln -sf python3.11 "$rootfs/usr/local/bin/python3"
	ln -sf python3 "$rootfs/usr/local/bin/python"
	# This machine may reach PyPI through a proxy whose CA only its own bundle trusts; the
	# stand-in trusts the same CAs, and its pip uses that bundle (PIP_CERT below).
	if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
		cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
	fi
	chroot "$rootfs" /bin/sh -c 'ldconfig && update-ca-certificates >/dev/null && apt-get clean' ||
		die "chroot setup of the stand-in failed"
	rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
	chroot "$rootfs" /usr/local/bin/python -c 'import ssl, ctypes, sqlite3, lzma, bz2, zlib, venv, ensurepip' ||
		die "the stand-in's Python cannot load its modules"
	log "importing the stand-in as $name"
	tar -C "$rootfs" -cf - . | podman import \
		--change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
		--change 'ENV LANG=C.UTF-8' \
		--change "ENV PYTHON_VERSION=$version" \
		--change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
		--change "LABEL org.opencontainers.image.description=taskmux-local-stand-in-python-$version" \
		--change 'CMD ["python3"]' - "$name" >/dev/null
	rm -rf "$rootfs"
}

ensure_base() {
	local name=$1
	if have_image "$name"; then
		log "base $name: in local storage"
	elif [[ ${STANDIN_ONLY:-0} != 1 ]] && timeout 60 buildah pull --quiet "$name" >/dev/null 2>&1; then
		log "base $name: pulled"
	else
		log "base $name: no registry answered; making the local stand-in"
		make_standin "$name"
	fi
}

cmd_build() {
	require_root_tools buildah podman debootstrap
	local files=() image base start
	for image in "${IMAGES[@]}"; do files+=("$ROOT/docker/$image.Dockerfile"); done
	while read -r base; do ensure_base "$base"; done < <(bases "${files[@]}")
	for image in "${IMAGES[@]}"; do
		start=$SECONDS
		log "building $(image_name "$image")"
		buildah build --isolation chroot --pull=never --layers=false \
			-f "$ROOT/docker/$image.Dockerfile" -t "$(image_name "$image")" "$ROOT" >&2
		log "built $(image_name "$image") in $((SECONDS - start)) s"
	done
	cmd_sizes
}

cmd_sizes() {
	buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E '(taskmux-|/python:)' || true
}

free_port() { "$CLIENT_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

SMOKE_PIDS=()
SMOKE_CONTAINERS=()
smoke_cleanup() {
	local pid ctr
	for pid in "${SMOKE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${SMOKE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
	for ctr in "${SMOKE_CONTAINERS[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
}

# Runs an image's component in the background: run_component IMAGE MODULE LOG ENV...
run_component() {
	local image=$1 module=$2 logfile=$3 ctr args=()
	shift 3
	ctr=$(buildah from --pull=never --name "taskmux-smoke-$module-$$" "$(image_name "$image")")
	SMOKE_CONTAINERS+=("$ctr")
	for env in "$@"; do args+=(--env "$env"); done
	buildah run --isolation chroot --network host "${args[@]}" \
		--volume "$MODEL_REPO:/models:ro" "$ctr" -- python -m "$module" >"$logfile" 2>&1 &
	SMOKE_PIDS+=("$!")
}

cmd_smoke() {
	require_root_tools buildah
	CLIENT_PYTHON=${CLIENT_PYTHON:-$ROOT/.venv/bin/python}
	MODEL_REPO=$(realpath "${MODEL_REPO:-$ROOT/model-repo}")
	[[ -f $MODEL_REPO/manifest.json ]] || die "no model repository at $MODEL_REPO: make model"
	local image valkey redis_port gateway_port health_port logs start
	for image in "${IMAGES[@]}"; do have_image "$(image_name "$image")" || die "$(image_name "$image") is not built: make images"; done
	logs=$WORK/smoke
	mkdir -p "$logs"
	trap smoke_cleanup EXIT
	start=$SECONDS
	valkey=$(cd "$ROOT" && "$CLIENT_PYTHON" -c 'from taskmux.local import redis_binary; print(redis_binary())')
	redis_port=$(free_port)
	"$valkey" --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no >"$logs/valkey.log" 2>&1 &
	SMOKE_PIDS+=("$!")
	gateway_port=$(free_port)
	health_port=$(free_port)
	local redis_url=redis://127.0.0.1:$redis_port/0
	run_component worker-cpu workers "$logs/worker.log" "TASKMUX_REDIS_URL=$redis_url" \
		"TASKMUX_HEALTH_ADDR=127.0.0.1:$health_port" "TASKMUX_METRICS_ADDR=127.0.0.1:$(free_port)" \
		TASKMUX_WORKER_ID=smoke-worker
	run_component gateway gateway "$logs/gateway.log" "TASKMUX_REDIS_URL=$redis_url" \
		"TASKMUX_LISTEN_ADDR=127.0.0.1:$gateway_port" "TASKMUX_METRICS_ADDR=127.0.0.1:$(free_port)" \
		TASKMUX_GATEWAY_ID=smoke-gateway
	log "Valkey :$redis_port, worker (health :$health_port), gateway :$gateway_port; logs in $logs"
	if ! (cd "$ROOT" && "$CLIENT_PYTHON" - "127.0.0.1:$gateway_port" <<'EOF'); then
import sys
import time

from taskmux_client import TaskMuxClient, TaskMuxError

target = sys.argv[1]
deadline = time.monotonic() + 120
while True:
    try:
        with TaskMuxClient(target, timeout_s=10) as client:
            vectors = client.embed(["hello", "world"]).embeddings
            result = client.classify("sentiment", ["I loved it"], top_k=2).results[0]
        break
    except TaskMuxError as err:
        if time.monotonic() > deadline:
            raise SystemExit(f"smoke: no answer from the images within 120 s: {err!r}")
        time.sleep(1)
dims = [len(v.values) for v in vectors]
assert dims == [384, 384], f"embed: dimensions {dims}"
assert result.label in ("negative", "positive"), f"classify: label {result.label!r}"
print(f"smoke: Embed 2 x {dims[0]} floats; Classify sentiment 'I loved it' -> {result.label}")
EOF
		log "smoke FAILED; last lines of the logs:"
		tail -n 20 "$logs"/*.log >&2
		exit 1
	fi
	log "smoke passed in $((SECONDS - start)) s"
}

case ${1:-} in
build) cmd_build ;;
smoke) cmd_smoke ;;
sizes) cmd_sizes ;;
bases) shift && bases "$@" ;;
*) die "usage: tools/images.sh build|smoke|sizes" ;;
esac
