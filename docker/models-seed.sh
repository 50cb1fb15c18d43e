#!/bin/sh
# seed-models SRC DST: copy every SRC/<model>/<version>/ that DST lacks into DST.
#
# Never overwrites: a version directory already in DST is kept as it is (cp -rn, and
# only into a fresh temporary folder). A copy goes to DST/<model>/.tmp-seed-<version>
# and is renamed into place, so TF Serving (which polls DST/<model>/ for numeric
# folders) never loads half a version. Leftovers of an interrupted seed are removed.
set -eu
src=${1:-/seed/models}
dst=${2:-/models}

[ -d "$src" ] || { echo "seed-models: $src: no such directory" >&2; exit 1; }
[ -d "$dst" ] && [ -w "$dst" ] || { echo "seed-models: $dst: not a writable directory (mount the model repository volume there)" >&2; exit 1; }

copied=0
kept=0
for version_dir in "$src"/*/*/; do
    [ -d "$version_dir" ] || continue
    version_dir=${version_dir%/}
    version=${version_dir##*/}
    model_dir=${version_dir%/*}
    model=${model_dir##*/}
    case $version in '' | *[!0-9]*) continue ;; esac # TF Serving versions are integers
    target="$dst/$model/$version"
    if [ -e "$target" ]; then
        echo "seed-models: kept $model/$version (already in $dst)"
        kept=$((kept + 1))
        continue
    fi
    mkdir -p "$dst/$model"
    tmp="$dst/$model/.tmp-seed-$version"
    rm -rf "$tmp"
    cp -rn "$version_dir" "$tmp"
    mv "$tmp" "$target"
    echo "seed-models: copied $model/$version"
    copied=$((copied + 1))
done
echo "seed-models: $copied version(s) copied, $kept kept"
