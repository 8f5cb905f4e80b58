"""Fetch a headless Chromium for the dashboard test into DEST (no root, no system packages).

The browser is @sparticuz/chromium from the npm registry: a chrome-headless-shell build that carries
the few shared libraries a minimal Linux lacks (NSS, expat) and its own fonts. The tarball is pinned by
its sha256; its brotli-compressed payloads are unpacked next to each other:

    DEST/chromium          the browser
    DEST/lib/              its libraries (LD_LIBRARY_PATH)
    DEST/fonts/fonts.conf  a fontconfig pointing at DEST/fonts (FONTCONFIG_PATH)

Usage: fetch_chromium.py DEST   (needs the `brotli` module on PYTHONPATH). Concurrent runs take
turns on DEST.lock; a complete DEST (its .complete marker) is left as it is.
"""

import fcntl
import hashlib
import io
import os
import shutil
import sys
import tarfile
import urllib.request

import brotli

VERSION = "153.0.0"
URL = f"https://registry.npmjs.org/@sparticuz/chromium/-/chromium-{VERSION}.tgz"
SHA256 = "20e5656fcdcf4118ede85edfb9d6bb9cc1bbb7ffb8b75622fffbcf36a835c3c0"


def payload(package: tarfile.TarFile, name: str) -> bytes:
    member = package.extractfile(f"package/bin/{name}")
    if member is None:
        sys.exit(f"fetch_chromium: {URL} has no bin/{name}")
    return brotli.decompress(member.read())


def untar(data: bytes, dest: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(dest, filter="data")
            return
        # Pythons before 3.11.4 have no extraction filters: refuse what the "data" filter would.
        members = archive.getmembers()
        for member in members:
            name = os.path.normpath(member.name)
            if os.path.isabs(name) or name.startswith(".."):
                sys.exit(f"fetch_chromium: refusing archive member {member.name!r}")
            if member.issym() or member.islnk():
                target = os.path.normpath(os.path.join(os.path.dirname(name), member.linkname))
                if os.path.isabs(member.linkname) or target.startswith(".."):
                    sys.exit(f"fetch_chromium: refusing link {member.name!r} -> {member.linkname!r}")
            if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                sys.exit(f"fetch_chromium: refusing special file {member.name!r}")
        archive.extractall(dest, members=members)


def fetch(dest: str) -> None:
    print(f"fetch_chromium: downloading {URL}", file=sys.stderr)
    with urllib.request.urlopen(URL, timeout=300) as response:
        tgz = response.read()
    digest = hashlib.sha256(tgz).hexdigest()
    if digest != SHA256:
        sys.exit(f"fetch_chromium: {URL} has sha256 {digest}, expected {SHA256}")
    partial = dest + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as package:
        browser = os.path.join(partial, "chromium")
        with open(browser, "wb") as out:
            out.write(payload(package, "chromium.br"))
        os.chmod(browser, 0o755)
        # The Amazon Linux libraries land in lib/; the SwiftShader ones beside the browser.
        untar(payload(package, "al2023.tar.br"), partial)
        untar(payload(package, "swiftshader.tar.br"), partial)
        untar(payload(package, "fonts.tar.br"), partial)
    fonts = os.path.join(dest, "fonts")
    with open(os.path.join(partial, "fonts", "fonts.conf"), "w") as conf:
        conf.write(
            '<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "fonts.dtd">\n<fontconfig>\n'
            f"  <dir>{fonts}</dir>\n  <cachedir>{os.path.join(dest, 'fonts-cache')}</cachedir>\n"
            "</fontconfig>\n"
        )
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(partial, dest)
    open(os.path.join(dest, ".complete"), "w").close()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: fetch_chromium.py DEST")
    dest = os.path.abspath(sys.argv[1])
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(dest, ".complete")):
            fetch(dest)
    print(os.path.join(dest, "chromium"))


if __name__ == "__main__":
    main()
