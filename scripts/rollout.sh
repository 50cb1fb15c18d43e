#!/usr/bin/env bash
# Roll a new model version out through TF Serving's models.config (stable/canary labels).
#
#   scripts/rollout.sh show [MODEL]                  versions and labels in models.config
#   scripts/rollout.sh add-version MODEL VERSION     serve VERSION too (TF Serving loads + warms it)
#   scripts/rollout.sh canary MODEL VERSION          canary := VERSION (must be served)
#   scripts/rollout.sh promote MODEL                 stable := canary
#   scripts/rollout.sh rollback MODEL VERSION        stable := VERSION (must be served)
#   scripts/rollout.sh remove-version MODEL VERSION  stop serving VERSION (no label may point at it)
#
#   scripts/rollout.sh render OVERLAY                the manifests of k8s/overlays/OVERLAY
#   scripts/rollout.sh apply OVERLAY                 render | kubectl apply -f -
#   scripts/rollout.sh wait MODEL VERSION [SECONDS]  until every TF Serving pod has VERSION AVAILABLE
#   scripts/rollout.sh train MODEL [TRAINING ARGS]   a training Job (k8s/jobs/train), for `kubectl create -f -`
#   scripts/rollout.sh prometheus-rule               deploy/alerts.yml as a PrometheusRule
#
# The label commands edit serving/tfserving/models.config in place (text edits that keep
# the file's layout and comments; $MODELS_CONFIG names another file); then `apply` the
# overlay: the ConfigMap is updated in place, TF Serving re-reads the file within
# --model_config_file_poll_wait_seconds (60 s) after the kubelet has refreshed the mount
# (about a minute), and the gateway reads the same file. Commit the edit.
#
# Order matters: TF Serving refuses a label that points at a version that is not loaded
# yet (the whole reload is rejected and the previous configuration kept), so
# add-version, apply, `wait` for AVAILABLE, and only then canary/promote.
#
# Environment: MODELS_CONFIG, NAMESPACE (classifier), KUBECTL (kubectl).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODELS_CONFIG=${MODELS_CONFIG:-$ROOT/serving/tfserving/models.config}
NAMESPACE=${NAMESPACE:-classifier}
KUBECTL=${KUBECTL:-kubectl}

die() {
    echo "rollout: $*" >&2
    exit 1
}

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

need_model() { [[ ${1:-} =~ ^[A-Za-z0-9_.-]+$ ]] || die "invalid model name '${1:-}'"; }
need_version() { [[ ${1:-} =~ ^[0-9]+$ ]] || die "invalid version '${1:-}' (a positive integer)"; }

# edit OP MODEL [VERSION]: rewrite the config { ... } block of MODEL in $MODELS_CONFIG.
# Expects the layout of the shipped file: one `model_version_policy { specific { versions: ... } }`
# line and one `version_labels { key: "..." value: N }` line per label.
edit() {
    local op=$1 model=$2 version=${3:-}
    [[ -f $MODELS_CONFIG ]] || die "$MODELS_CONFIG: no such file"
    local tmp
    tmp=$(mktemp "${MODELS_CONFIG}.XXXXXX")
    # shellcheck disable=SC2016  # awk program, not shell
    if ! awk -v op="$op" -v model="$model" -v version="$version" '
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
    ' "$MODELS_CONFIG" >"$tmp"; then
        rm -f "$tmp"
        exit 1
    fi
    if [[ $op == show ]]; then
        cat "$tmp"
        rm -f "$tmp"
        return
    fi
    # Keep the file (and its mode); only its content changes.
    cat "$tmp" >"$MODELS_CONFIG"
    rm -f "$tmp"
}

show_all() {
    local names
    names=$(sed -n 's/^[[:space:]]*name:[[:space:]]*"\([^"]*\)".*/\1/p' "$MODELS_CONFIG")
    for m in $names; do edit show "$m"; done
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
        sleep 5
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
    if [[ $# -ge 1 ]]; then need_model "$1"; edit show "$1"; else show_all; fi
    ;;
add-version | remove-version | canary | rollback)
    [[ $# -eq 2 ]] || usage
    need_model "$1"
    need_version "$2"
    edit "$cmd" "$1" "$2"
    edit show "$1"
    case $cmd in
    add-version) echo "next: apply the overlay, then: $0 wait $1 $2 && $0 canary $1 $2" ;;
    canary) echo "next: apply the overlay; try it: curl ... -d '{\"texts\": [...], \"model\": \"$1\", \"version_label\": \"canary\"}'" ;;
    esac
    ;;
promote)
    [[ $# -eq 1 ]] || usage
    need_model "$1"
    edit promote "$1"
    edit show "$1"
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
    wait_available "$@"
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
