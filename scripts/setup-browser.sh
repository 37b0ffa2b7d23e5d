#!/bin/sh
# Headless Chromium for the `vrex serve` browser test (tests/serve/test_serve_browser.py), from
# Debian's package: Playwright drives it through executable_path, so no browser is downloaded at
# run time. Quick and silent when it is already installed; needs root (or sudo) otherwise.
set -e
CHROMIUM="${VREX_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-browser: no $CHROMIUM and no apt-get: install Chromium and set VREX_CHROMIUM to it" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
echo "setup-browser: installing Debian's chromium (for the browser test of vrex serve)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
"$CHROMIUM" --version
