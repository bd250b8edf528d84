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
