"""Module-level party functions for the three-process tests (they must be importable/picklable)."""
import os
import time


from secure_inference.mpc import protocols as P


def linear_pipeline(p, x, y, w, b):
    """Share x (client) and y (server), then conv with server weights, Beaver mul, global pool."""
    xs = P.share(p, x if p.role == 0 else None, 0, x.shape)
    ys = P.share(p, y if p.role == 1 else None, 1, y.shape)
    conv = P.conv2d(p, xs, w if p.role == 1 else None, b if p.role == 1 else None,
                    weight_shape=w.shape, padding=1, name="conv1")
    prod = P.mul(p, xs, ys)
    pooled = P.global_avg_pool2d(p, xs)
    outs = [P.reconstruct(p, t, to=0) for t in (conv, prod, pooled)]
    return (outs if p.role == 0 else None), p.stats


def server_dies(p):
    """The server's process is killed in the middle of a protocol."""
    if p.role == 1:
        os._exit(3)
    p.recv(1, (4,))


def server_stalls(p):
    """The server goes silent for longer than the timeout."""
    if p.role == 1:
        time.sleep(3.0)
        return None
    p.recv(1, (4,))


def noop(p):
    return p.role


def run_and_report(p, private, program):
    """What a CLI party does: run the program on its private input, then the report exchange."""
    from secure_inference.mpc.party import gather_results, run_party
    res = run_party(p, program, images=private if p.role == 0 else None,
                    weights=private if p.role == 1 else None)
    gather_results(p, res)
    return p.role


def server_fails_with_a_private_message(p):
    """The server fails with an error whose message quotes a private value; the others wait."""
    if p.role == 1:
        raise ValueError("layer 'conv' has a weight of magnitude 42.4242")
    p.recv(1, (4,))
