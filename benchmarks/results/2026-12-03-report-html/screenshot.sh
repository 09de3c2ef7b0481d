#!/usr/bin/env bash
# Full-page screenshots of a run folder's report.html and compare.html in headless Chromium:
#   screenshot.sh RUN_FOLDER OUT_FOLDER
# The page height is measured first (a copy of the page with a one-line script that writes it into the
# DOM, read back with --dump-dom), then the page itself is shot in a window of that height.
set -euo pipefail
run=$(realpath "$1"); dest=$(realpath "$2")
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --hide-scrollbars --host-resolver-rules="MAP * ~NOTFOUND")
for page in report compare; do
  [ -f "$run/$page.html" ] || continue
  sed 's#</body>#<script>addEventListener("load",function(){var p=document.createElement("pre");p.id="h";p.textContent=document.documentElement.scrollHeight;document.body.appendChild(p)})</script></body>#' \
    "$run/$page.html" > "$tmp/$page.html"
  height=$(chromium "${flags[@]}" --user-data-dir="$tmp/p1-$page" --window-size=1280,800 --dump-dom \
           "file://$tmp/$page.html" 2>/dev/null | sed -n 's/.*<pre id="h">\([0-9]*\)<.*/\1/p')
  chromium "${flags[@]}" --user-data-dir="$tmp/p2-$page" --window-size="1280,${height:-4000}" \
    --screenshot="$dest/$page.png" "file://$run/$page.html" 2>/dev/null
  echo "$dest/$page.png: 1280 x ${height:-4000}"
done
