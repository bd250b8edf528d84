"""The command lines, one module per command, each with its parser and ``main(argv) -> int``.

| module | console script | also runs as |
|---|---|---|
| extract_block_sizes | si-extract | research/extract_block_sizes.py |
| knapsack_patch_size_extractor | si-knapsack | research/knapsack_patch_size_extractor.py |
| server | si-server | research/secure_inference/server.py |
| client | si-client | research/secure_inference/client.py |
| crypto_provider | si-crypto-provider | research/secure_inference/crypto_provider.py |
| make_certificates | si-certificates | research/secure_inference/make_certificates.py |
| mmlab_train | si-train | mmlab_tools/train.py (dist_train.sh) |
| mmlab_test | si-test | mmlab_tools/test.py (dist_test.sh) |

They parse their arguments before torch, mmengine or the MMLab packages load (``--help``
answers at once) and are thin: the work is done by library functions. Library code never
prints; these modules do.
"""
import sys as _sys

if getattr(_sys.modules[__name__.rpartition(".")[0]], "__file__", None) is None:
    # A script in research/ puts research/ first on sys.path, where the folder
    # research/secure_inference/ (the party scripts; no __init__.py) is a namespace package
    # named like the library. With setuptools' default editable install the library is found
    # by an import hook that runs only after that path search, so the namespace wins and
    # everything the package's __init__ defines is missing. Say what to do.
    raise SystemExit(
        "error: `import secure_inference` found the folder research/secure_inference/ (the "
        "party scripts) instead of the library, because the library was installed in "
        "setuptools' default editable mode. Reinstall it with\n"
        "    pip install -e . --config-settings editable_mode=compat\n"
        "(what `make install` does) or `pip install .`, or run the console script instead "
        "(si-extract, si-knapsack, ...: see secure_inference/cli/__init__.py).")
