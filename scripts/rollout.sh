#!/usr/bin/env bash
# Roll a new model version out: TF Serving's models.config (versions, stable/canary labels) and
# the gateway's traffic file beside it (the canary's share of default requests, and of the shadow).
#
#   scripts/rollout.sh show [MODEL]                  versions, labels and traffic shares
#   scripts/rollout.sh add-version MODEL VERSION     serve VERSION too (TF Serving loads + warms it)
#   scripts/rollout.sh canary MODEL VERSION          canary := VERSION (must be served)
#   scripts/rollout.sh traffic MODEL PERCENT         canary_percent := PERCENT (0-100) of default requests
#   scripts/rollout.sh shadow MODEL PERCENT          shadow_percent := PERCENT (0-100): also scored by the canary
#   scripts/rollout.sh analyze MODEL [ARGS...]       canary vs stable from Prometheus (python -m serving.analyze)
#   scripts/rollout.sh promote MODEL                 stable := canary, and canary_percent := 0
#   scripts/rollout.sh rollback MODEL VERSION        stable := VERSION (must be served)
#   scripts/rollout.sh remove-version MODEL VERSION  stop serving VERSION (no label may point at it)
#
#   scripts/rollout.sh render OVERLAY                the manifests of k8s/overlays/OVERLAY
#   scripts/rollout.sh apply OVERLAY                 render | kubectl apply -f -
#   scripts/rollout.sh wait MODEL VERSION [SECONDS]  until every TF Serving pod has VERSION AVAILABLE
#                                                    (with $GATEWAY_URL: until those gateways say it is ready)
#   scripts/rollout.sh train MODEL [TRAINING ARGS]   a training Job (k8s/jobs/train), for `kubectl create -f -`
#   scripts/rollout.sh prometheus-rule               deploy/alerts.yml as a PrometheusRule
#
# Files: the label and version commands edit serving/tfserving/models.config (text edits that
# keep the file's layout and comments; $MODELS_CONFIG names another file); traffic, shadow and
# promote edit traffic.json beside it ($TRAFFIC_FILE; JSON, by model:
# {"MODEL": {"canary_percent": N, "shadow_percent": N}}, a model not named is at 0/0).
# Every edit is checked first by the gateway's own checker
# (python -m serving check-config NEW --previous CURRENT --traffic TRAFFIC): when it refuses,
# its reason is printed, nothing is written, exit 1. An accepted edit is written to a temporary
# file in the same folder, given the old file's mode and renamed over it, so TF Serving and the
# gateway read the old file or the new one, never a half-written one. Mount the FOLDER (a bind
# mount of the file itself keeps the old inode; a ConfigMap mounted with subPath never updates).
#
# Then `apply` the overlay: the ConfigMap holding both files is updated in place, TF Serving
# re-reads models.config within --model_config_file_poll_wait_seconds (60 s) after the kubelet
# has refreshed the mount (about a minute), and the gateway reads the same two files. Commit
# the edit. (docker compose mounts serving/tfserving/ itself: edits apply without a step.)
#
# Order matters: TF Serving refuses a label that points at a version that is not loaded
# yet (the whole reload is rejected and the previous configuration kept), so
# add-version, apply, `wait` for AVAILABLE, and only then canary, traffic and promote.
#
# Environment: MODELS_CONFIG, TRAFFIC_FILE, PYTHON (.venv/bin/python if there, else python3),
# MODEL_REPOSITORY (set: check-config also checks every served version is in it), CHECK_TIMEOUT
# (120 s), GATEWAY_URL (`wait`: these gateways, space-separated, e.g. http://127.0.0.1:8000,
# instead of kubectl), POLL_SECONDS (5), NAMESPACE (classifier), KUBECTL (kubectl).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAMESPACE=${NAMESPACE:-classifier}
KUBECTL=${KUBECTL:-kubectl}
POLL_SECONDS=${POLL_SECONDS:-5}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-120}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi

die() {
    echo "rollout: $*" >&2
    exit 1
}

usage() {
    sed -n '2,/^# Files:/{/^# Files:/d;s/^# \{0,1\}//p;}' "${BASH_SOURCE[0]}" >&2
    exit 2
}

# abspath FILE: FILE as an absolute path; through a symbolic link (the edit replaces its target).
abspath() {
    local p=$1
    if [[ -L $p ]]; then p=$(readlink -f -- "$p"); fi
    [[ $p == /* ]] || p=$PWD/$p
    printf '%s\n' "$p"
}

MODELS_CONFIG=${MODELS_CONFIG:-$ROOT/serving/tfserving/models.config}
TRAFFIC_FILE=${TRAFFIC_FILE:-$(dirname "$MODELS_CONFIG")/traffic.json}
MODELS_CONFIG=$(abspath "$MODELS_CONFIG")
TRAFFIC_FILE=$(abspath "$TRAFFIC_FILE")

TMPFILES=()
cleanup() { if ((${#TMPFILES[@]})); then rm -f -- "${TMPFILES[@]}"; fi; }
trap cleanup EXIT

need_model() { [[ ${1:-} =~ ^[A-Za-z0-9_.-]+$ ]] || die "invalid model name '${1:-}'"; }
need_version() { [[ ${1:-} =~ ^[0-9]+$ ]] || die "invalid version '${1:-}' (a positive integer)"; }
need_percent() {
    if [[ ! ${1:-} =~ ^([0-9]+(\.[0-9]*)?|\.[0-9]+)$ ]] || ! awk -v p="$1" 'BEGIN { exit !(p + 0 <= 100) }'; then
        die "invalid percent '${1:-}' (a number from 0 to 100)"
    fi
}

# new_tmp VAR FILE: VAR := a new, empty file beside FILE (the same file system, so renaming it
# over FILE is atomic); removed at exit unless renamed.
new_tmp() {
    local dir base tmp
    dir=$(dirname "$2")
    base=$(basename "$2")
    tmp=$(mktemp "$dir/.$base.XXXXXX") || die "cannot create a temporary file in $dir"
    TMPFILES+=("$tmp")
    printf -v "$1" '%s' "$tmp"
}

# install_file TMP FILE: TMP renamed over FILE, with FILE's mode (a new FILE: what umask gives).
# rename(2) swaps the directory entry at once: a reader opens the old inode or the new one,
# whole; never an empty or half-written file (which `cat TMP >FILE`, truncating first, shows).
install_file() {
    local tmp=$1 target=$2
    if [[ -e $target ]]; then
        chmod --reference="$target" -- "$tmp" 2>/dev/null || chmod "$(stat -f %Lp "$target")" "$tmp"
    else
        chmod "$(printf '%o' $((0666 & ~$(umask))))" "$tmp"
    fi
    mv -f -- "$tmp" "$target"
}

# check CONFIG TRAFFIC: would the gateway apply CONFIG in place of $MODELS_CONFIG, with TRAFFIC?
# Its own checker answers (python -m serving check-config); a refusal prints why and exits 1.
check() {
    local config=$1 traffic=$2 out rc=0
    local args=(-m serving check-config "$config" --previous "$MODELS_CONFIG") runner=()
    if [[ -e $traffic ]]; then args+=(--traffic "$traffic"); fi
    if [[ -n ${MODEL_REPOSITORY:-} ]]; then args+=(--models "$(abspath "$MODEL_REPOSITORY")"); fi
    if command -v timeout >/dev/null; then runner=(timeout "$CHECK_TIMEOUT"); fi
    out=$(cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        ${runner[@]+"${runner[@]}"} "$PYTHON" "${args[@]}" 2>&1 >/dev/null) || rc=$?
    if ((rc == 0)); then return; fi
    out=${out//"$config"/"$MODELS_CONFIG"}
    out=${out//"$traffic"/"$TRAFFIC_FILE"}
    if [[ -n $out ]]; then printf '%s\n' "$out" >&2; fi
    if ((rc == 124)); then
        die "$PYTHON -m serving check-config did not answer within ${CHECK_TIMEOUT}s: nothing written"
    fi
    die "check-config refused the edit (exit $rc): nothing written"
}

# rewrite OP MODEL [VERSION]: $MODELS_CONFIG with the config { ... } block of MODEL edited, on
# stdout (OP show: that model's versions and labels, one line). Expects the layout of the shipped
# file: one `model_version_policy { specific { versions: ... } }` line and one
# `version_labels { key: "..." value: N }` line per label.
rewrite() {
    local op=$1 model=$2 version=${3:-}
    [[ -f $MODELS_CONFIG ]] || die "$MODELS_CONFIG: no such file"
    # shellcheck disable=SC2016  # awk program, not shell
    awk -v op="$op" -v model="$model" -v version="$version" '
        function fail(msg) { print "rollout: " model ": " msg > "/dev/stderr"; failed = 1; exit 1 }
        function braces(line,   code, opens, closes) {
            code = line; sub(/#.*/, "", code)
            opens = gsub(/\{/, "{", code); closes = gsub(/\}/, "}", code)
            return opens - closes
        }
        function label_line(label,   i) {
            for (i = 1; i <= n; i++)
                if (buf[i] ~ "version_labels[ \t]*\\{[ \t]*key:[ \t]*\"" label "\"") return i
            return 0
        }
        function label_value(label,   i, s) {
            i = label_line(label); if (!i) return ""
            s = buf[i]; sub(/.*value:[ \t]*/, "", s); sub(/[^0-9].*/, "", s); return s
        }
        function set_label(label, v,   i, indent) {
            if (!served[v]) fail("version " v " is not served (add-version first, and wait until it is AVAILABLE)")
            i = label_line(label)
            if (i) { sub(/value:[ \t]*[0-9]+/, "value: " v, buf[i]); return }
            indent = buf[policy]; sub(/[^ \t].*/, "", indent)
            for (i = n; i > policy; i--) buf[i + 1] = buf[i]
            n++; buf[policy + 1] = indent "version_labels { key: \"" label "\" value: " v " }"
        }
        function sorted_versions(   i, j, t, k, s, v) {
            split("", list); k = 0; for (v in served) if (served[v]) list[++k] = v + 0
            for (i = 2; i <= k; i++) { t = list[i]; for (j = i - 1; j >= 1 && list[j] > t; j--) list[j + 1] = list[j]; list[j + 1] = t }
            s = ""; for (i = 1; i <= k; i++) s = s (i > 1 ? " " : "") list[i]
            return s
        }
        function write_versions(   s) {
            s = sorted_versions(); gsub(/ /, " versions: ", s)
            sub(/specific[ \t]*\{[^}]*\}/, "specific { versions: " s " }", buf[policy])
        }
        function process(   i, name, s, v, labels) {
            name = ""; policy = 0
            for (i = 1; i <= n; i++) {
                if (name == "" && buf[i] ~ /^[ \t]*name:[ \t]*"/) { s = buf[i]; sub(/^[ \t]*name:[ \t]*"/, "", s); sub(/".*/, "", s); name = s }
                if (buf[i] ~ /model_version_policy/) policy = i
            }
            if (name != model) return
            found = 1
            if (!policy || buf[policy] !~ /specific[ \t]*\{[^}]*\}/)
                fail("expected one line `model_version_policy { specific { versions: ... } }` in its config block")
            split("", served); s = buf[policy]; sub(/.*specific[ \t]*\{/, "", s); sub(/\}.*/, "", s)
            while (match(s, /versions:[ \t]*[0-9]+/)) { v = substr(s, RSTART, RLENGTH); sub(/.*:[ \t]*/, "", v); served[v + 0] = 1; s = substr(s, RSTART + RLENGTH) }
            if (op == "show") {
                printf "%s: served versions %s; stable=%s canary=%s\n", model, sorted_versions(), label_value("stable"), label_value("canary")
                return
            }
            if (op == "add-version") {
                if (served[version + 0]) { print "rollout: " model ": version " version " is already served" > "/dev/stderr"; return }
                served[version + 0] = 1; write_versions(); changed = 1
            } else if (op == "remove-version") {
                if (!served[version + 0]) fail("version " version " is not served")
                for (labels = 1; labels <= 2; labels++) {
                    s = labels == 1 ? "stable" : "canary"
                    if (label_value(s) == version + 0) fail("label " s " points at version " version ": move it first")
                }
                served[version + 0] = 0; k = 0; for (v in served) if (served[v]) k++
                if (!k) fail("version " version " is the last one served")
                write_versions(); changed = 1
            } else if (op == "canary") {
                set_label("canary", version + 0); changed = 1
            } else if (op == "rollback") {
                set_label("stable", version + 0); changed = 1
            } else if (op == "promote") {
                v = label_value("canary")
                if (v == "") fail("no canary label to promote")
                set_label("stable", v + 0); changed = 1
            }
        }
        {
            line = $0
            if (!inblock && depth == 1 && line ~ /^[ \t]*config[ \t]*\{/) { inblock = 1; n = 0 }
            depth += braces(line)
            if (inblock) {
                buf[++n] = line
                if (depth == 1) { process(); if (op != "show") for (i = 1; i <= n; i++) print buf[i]; inblock = 0 }
                next
            }
            if (op != "show") print line
        }
        END {
            if (failed) exit 1
            if (depth != 0 || inblock) { print "rollout: unbalanced braces in the config file" > "/dev/stderr"; exit 1 }
            if (model != "" && !found) { print "rollout: no model named \"" model "\" in the config file" > "/dev/stderr"; exit 1 }
        }
    ' "$MODELS_CONFIG"
}

# set_traffic MODEL KEY PERCENT: $TRAFFIC_FILE with MODEL's KEY := PERCENT, on stdout (JSON,
# 2-space indent, key order kept; a model not there yet is added, unless PERCENT is 0).
set_traffic() {
    "$PYTHON" - "$TRAFFIC_FILE" "$@" <<'EOF'
import json, sys
path, model, key, value = sys.argv[1:]
try:
    with open(path, encoding="utf-8") as f:
        text = f.read()
except FileNotFoundError:
    text = ""
try:
    data = json.loads(text) if text.strip() else {}
except ValueError as e:
    sys.exit(f"rollout: {path}: not JSON ({e})")
if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
    sys.exit(f'rollout: {path}: expected {{"MODEL": {{"canary_percent": N, "shadow_percent": N}}, ...}}')
number = float(value)
if not 0 <= number <= 100:
    sys.exit(f"rollout: {key} must be a number from 0 to 100, not {value}")
number = int(number) if number.is_integer() else number
if model in data:
    data[model][key] = number
elif number:
    data[model] = {"canary_percent": 0, "shadow_percent": 0}
    data[model][key] = number
sys.stdout.write(json.dumps(data, indent=2) + "\n")
EOF
}

# traffic_of MODEL...: one line per MODEL, "canary_percent=N shadow_percent=N" from $TRAFFIC_FILE.
traffic_of() {
    "$PYTHON" - "$TRAFFIC_FILE" "$@" <<'EOF'
import json, sys
path, models = sys.argv[1], sys.argv[2:]
try:
    with open(path, encoding="utf-8") as f:
        data = json.loads(f.read() or "{}")
except FileNotFoundError:
    data = {}
except ValueError as e:
    sys.exit(f"rollout: {path}: not JSON ({e})")
for m in models:
    entry = data.get(m) if isinstance(data, dict) else None
    entry = entry if isinstance(entry, dict) else {}
    print(" ".join(f"{k}={json.dumps(entry.get(k, 0))}" for k in ("canary_percent", "shadow_percent")))
EOF
}

# edit_config OP MODEL [VERSION]: models.config edited, checked, renamed into place; promote
# also sets the model's canary_percent to 0 (stable is the canary now), in the same check.
edit_config() {
    local op=$1 model=$2 version=${3:-} config traffic=$TRAFFIC_FILE
    new_tmp config "$MODELS_CONFIG"
    rewrite "$op" "$model" "$version" >"$config" || exit 1
    if [[ $op == promote && -e $TRAFFIC_FILE ]]; then
        new_tmp traffic "$TRAFFIC_FILE"
        set_traffic "$model" canary_percent 0 >"$traffic" || exit 1
        if cmp -s "$traffic" "$TRAFFIC_FILE"; then traffic=$TRAFFIC_FILE; fi
    fi
    if cmp -s "$config" "$MODELS_CONFIG" && [[ $traffic == "$TRAFFIC_FILE" ]]; then
        return # nothing changes
    fi
    check "$config" "$traffic"
    cmp -s "$config" "$MODELS_CONFIG" || install_file "$config" "$MODELS_CONFIG"
    [[ $traffic == "$TRAFFIC_FILE" ]] || install_file "$traffic" "$TRAFFIC_FILE"
}

# edit_traffic MODEL KEY PERCENT: traffic.json edited, checked against models.config, renamed into place.
edit_traffic() {
    local traffic
    rewrite show "$1" >/dev/null # MODEL is in models.config
    new_tmp traffic "$TRAFFIC_FILE"
    set_traffic "$@" >"$traffic" || exit 1
    if [[ -e $TRAFFIC_FILE ]] && cmp -s "$traffic" "$TRAFFIC_FILE"; then
        return # nothing changes
    fi
    check "$MODELS_CONFIG" "$traffic"
    install_file "$traffic" "$TRAFFIC_FILE"
}

# show [MODEL...]: versions, labels and traffic shares of each MODEL (none: every model).
show() {
    local names=("$@") lines=() shares=() line i
    if ((${#names[@]} == 0)); then
        [[ -f $MODELS_CONFIG ]] || die "$MODELS_CONFIG: no such file"
        while IFS= read -r line; do names+=("$line"); done < <(
            sed -n 's/^[[:space:]]*name:[[:space:]]*"\([^"]*\)".*/\1/p' "$MODELS_CONFIG")
        ((${#names[@]})) || return 0
    fi
    for i in "${!names[@]}"; do
        line=$(rewrite show "${names[i]}")
        lines+=("$line")
    done
    line=$(traffic_of "${names[@]}")
    while IFS= read -r i; do shares+=("$i"); done <<<"$line"
    for i in "${!names[@]}"; do
        printf '%s; %s\n' "${lines[i]}" "${shares[i]}"
    done
}

render() {
    local overlay=${1:-}
    [[ -n $overlay && -d $ROOT/k8s/overlays/$overlay ]] || die "no overlay '$overlay' (k8s/overlays/: $(cd "$ROOT/k8s/overlays" && echo *))"
    "$KUBECTL" kustomize "$ROOT/k8s/overlays/$overlay"
}

wait_available() {
    local model=$1 version=$2 timeout=${3:-600} deadline pods pod pending
    deadline=$((SECONDS + timeout))
    while :; do
        pods=$("$KUBECTL" -n "$NAMESPACE" get pods -l app.kubernetes.io/name=tfserving \
            --field-selector=status.phase=Running -o name)
        [[ -n $pods ]] || die "no running TF Serving pod in namespace $NAMESPACE"
        pending=0
        for pod in $pods; do
            # shellcheck disable=SC2016  # runs in the pod
            if ! "$KUBECTL" -n "$NAMESPACE" exec "$pod" -c tfserving -- bash -c '
                exec 3<>/dev/tcp/127.0.0.1/8501 || exit 1
                printf "GET /v1/models/%s/versions/%s HTTP/1.0\r\nHost: localhost\r\n\r\n" "$0" "$1" >&3
                grep -q "\"AVAILABLE\"" <&3' "$model" "$version" >/dev/null 2>&1; then
                pending=$((pending + 1))
            fi
        done
        if ((pending == 0)); then
            echo "rollout: $model version $version is AVAILABLE on every TF Serving pod"
            return
        fi
        ((SECONDS < deadline)) || die "$model version $version not AVAILABLE on $pending pod(s) after ${timeout}s (kubectl -n $NAMESPACE logs deploy/tfserving)"
        sleep "$POLL_SECONDS"
    done
}

# http_status URL: the status GET URL answers with (000: no answer).
http_status() {
    if command -v curl >/dev/null; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 5 -- "$1" || true
    else
        "$PYTHON" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
    fi
}

# wait_ready MODEL VERSION [SECONDS]: until every gateway of $GATEWAY_URL answers 200 on
# /v2/models/MODEL/versions/VERSION/ready (local and embedded deployments: the gateway loads
# the versions itself, no TF Serving pods to ask).
wait_ready() {
    local model=$1 version=$2 timeout=${3:-600} deadline url code pending last=""
    deadline=$((SECONDS + timeout))
    while :; do
        pending=0
        for url in $GATEWAY_URL; do
            code=$(http_status "${url%/}/v2/models/$model/versions/$version/ready")
            if [[ $code != 200 ]]; then
                pending=$((pending + 1))
                last="${url%/} answered ${code/#000/nothing}"
            fi
        done
        if ((pending == 0)); then
            echo "rollout: $model version $version is ready on every gateway ($GATEWAY_URL)"
            return
        fi
        ((SECONDS < deadline)) || die "$model version $version not ready on $pending gateway(s) after ${timeout}s (last: $last)"
        sleep "$POLL_SECONDS"
    done
}

json_string() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

train_job() {
    local model=$1
    shift
    need_model "$model"
    local name ops a
    name=$(tr '[:upper:]' '[:lower:]' <<<"train-${model//_/-}-$(date -u +%Y%m%d%H%M%S)")
    ops="{\"op\": \"replace\", \"path\": \"/metadata/name\", \"value\": $(json_string "$name")}"
    for a in "$@"; do
        ops+=", {\"op\": \"add\", \"path\": \"/spec/template/spec/containers/0/args/-\", \"value\": $(json_string "$a")}"
    done
    # The Job of k8s/jobs/train with a unique name, MODEL set and any extra training
    # arguments appended (all offline: --local).
    "$KUBECTL" kustomize "$ROOT/k8s/jobs/train" |
        "$KUBECTL" set env --local -f - "MODEL=$model" -o yaml |
        "$KUBECTL" patch --local -f - --type=json -p "[$ops]" -o yaml
}

prometheus_rule() {
    local alerts=$ROOT/deploy/alerts.yml
    [[ -f $alerts ]] || die "$alerts: no such file"
    cat <<EOF
# Generated by scripts/rollout.sh prometheus-rule from deploy/alerts.yml: do not edit.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: classifier-gateway
  namespace: $NAMESPACE
  labels:
    app.kubernetes.io/part-of: classifier
spec:
EOF
    sed -e 's/^\(.\)/  \1/' "$alerts"
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case $cmd in
show)
    for m in "$@"; do need_model "$m"; done
    show "$@"
    ;;
add-version | remove-version | canary | rollback)
    [[ $# -eq 2 ]] || usage
    need_model "$1"
    need_version "$2"
    edit_config "$cmd" "$1" "$2"
    show "$1"
    case $cmd in
    add-version) echo "next: apply the overlay, then: $0 wait $1 $2 && $0 canary $1 $2" ;;
    canary) echo "next: apply the overlay; try it: curl ... -d '{\"texts\": [...], \"model\": \"$1\", \"version_label\": \"canary\"}'; then: $0 traffic $1 10 (and/or $0 shadow $1 PERCENT)" ;;
    esac
    ;;
traffic | shadow)
    [[ $# -eq 2 ]] || usage
    need_model "$1"
    need_percent "$2"
    if [[ $cmd == traffic ]]; then key=canary_percent; else key=shadow_percent; fi
    edit_traffic "$1" "$key" "$2"
    show "$1"
    echo "next: apply the overlay; compare the canary with stable: $0 analyze $1 --window 10m; then: $0 promote $1"
    ;;
promote)
    [[ $# -eq 1 ]] || usage
    need_model "$1"
    edit_config promote "$1"
    show "$1"
    ;;
analyze)
    [[ $# -ge 1 ]] || usage
    need_model "$1"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    exec "$PYTHON" -m serving.analyze "$@"
    ;;
render)
    [[ $# -eq 1 ]] || usage
    render "$1"
    ;;
apply)
    [[ $# -eq 1 ]] || usage
    render "$1" | "$KUBECTL" apply -f -
    ;;
wait)
    [[ $# -ge 2 && $# -le 3 ]] || usage
    need_model "$1"
    need_version "$2"
    [[ $# -lt 3 || $3 =~ ^[0-9]+$ ]] || die "invalid timeout '$3' (seconds)"
    if [[ -n ${GATEWAY_URL:-} ]]; then wait_ready "$@"; else wait_available "$@"; fi
    ;;
train)
    [[ $# -ge 1 ]] || usage
    train_job "$@"
    ;;
prometheus-rule)
    [[ $# -eq 0 ]] || usage
    prometheus_rule
    ;;
*)
    usage
    ;;
esac
