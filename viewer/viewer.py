"""`make viewer`: the OHIF viewer (npm package @ohif/app, prebuilt) pointed at this archive.

Downloads the package tarball once with `npm pack` (no build, no dependency install), writes an
app-config.js whose data source is DICOMWEB_URL, and serves the viewer on VIEWER_HOST:VIEWER_PORT
(default 127.0.0.1:3000) with the single-page-app fallback OHIF's routes need.

    python viewer/viewer.py [--prepare-only]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OHIF_VERSION = "3.13.2"
HERE = Path(__file__).resolve().parent
CACHE = HERE.parent / ".viewer" / OHIF_VERSION
DEFAULT_DICOMWEB_URL = "http://127.0.0.1:8080/dicom-web"

# OHIF's dicomweb data source, configured for what this server supports (see
# conformance/STATEMENT.md): includefield, fuzzy matching, wildcards, server-side thumbnails.
CONFIG = """window.config = {{
  name: 'dicomweb-server',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {{}},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: {{ option: 'never' }},
  maxNumRequests: {{ interaction: 100, thumbnail: 5, prefetch: 10 }},
  showErrorDetails: 'always',
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {{
        friendlyName: 'dicomweb-server',
        name: 'dicomweb-server',
        wadoUriRoot: {url},
        qidoRoot: {url},
        wadoRoot: {url},
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'thumbnail',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: {{ enabled: true }},
        omitQuotationForMultipartRequest: false,
      }},
    }},
  ],
}};
"""


def prepare(dicomweb_url: str) -> Path:
    """The viewer's files, downloaded once, with app-config.js pointing at `dicomweb_url`."""
    dist = CACHE / "dist"
    if not (dist / "index.html").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            npm = shutil.which("npm")
            if npm is None:
                raise SystemExit("npm is needed to download the OHIF viewer (@ohif/app)")
            subprocess.run(
                [npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--silent"], cwd=tmp, check=True
            )
            (tarball,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(dist, ignore_errors=True)
            shutil.move(Path(tmp) / "package" / "dist", dist)
    (dist / "app-config.js").write_text(CONFIG.format(url=json.dumps(dicomweb_url)))
    return dist


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files; any other path is the app (OHIF routes such as /viewer?...)."""

    def send_head(self):  # type: ignore[no-untyped-def]
        path = Path(self.translate_path(self.path))
        if not path.exists():
            self.path = "/index.html"
        return super().send_head()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()
    url = os.environ.get("DICOMWEB_URL", DEFAULT_DICOMWEB_URL)
    dist = prepare(url)
    if args.prepare_only:
        print(dist)
        return 0
    host = os.environ.get("VIEWER_HOST", "127.0.0.1")
    port = int(os.environ.get("VIEWER_PORT", "3000"))
    handler = functools.partial(_Handler, directory=str(dist))
    server = http.server.ThreadingHTTPServer((host, port), handler)
    print(f"OHIF viewer on http://{host}:{port}/ reading {url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
