#!/usr/bin/env bash
# System packages some tests use (Debian/Ubuntu): the emoji font for `ldmkit data emoji`, Unicode's
# emoji-test.txt (unicode-data: the emoji groups of eval_emoji --balanced), and Chromium for the
# web-page test. Skipped quietly where apt-get or root is not available; the tests that need them
# then skip with the reason.
set -uo pipefail
need=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || need+=(unicode-data)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: no apt-get; install ${need[*]} yourself to run every test" >&2; exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "system-deps: not root; install ${need[*]} yourself to run every test" >&2; exit 0
    fi
fi
$SUDO apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
    || echo "system-deps: could not install ${need[*]}" >&2
exit 0
