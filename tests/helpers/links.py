"""Three parties' links over 127.0.0.1 in threads, for the transport and certificate tests."""
from __future__ import annotations

import threading
from typing import Any, Callable

from secure_inference.mpc.transport.connect import connect_links


def connect_three(addresses: dict, listeners: dict, tls_for: Callable[[int], Any],
                  inspect: Callable[[dict], Any], *, allow_plaintext: bool = False,
                  timeout: float = 5.0) -> tuple[Any, dict[int, BaseException]]:
    """``connect_links`` for parties 0, 1, 2 at once; ``inspect(links)`` looks at the links
    while they are open (role -> peer -> link); then every link is closed concurrently, as
    parties would, and the listeners too. Returns (what inspect returned, errors by role)."""
    out, errs = {}, {}

    def party(role: int) -> None:
        try:
            out[role] = connect_links(role, addresses, listeners.get(role), tls=tls_for(role),
                                      allow_plaintext=allow_plaintext, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errs[role] = exc

    threads = [threading.Thread(target=party, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    seen = inspect(out)
    closers = [threading.Thread(target=link.close)
               for links in out.values() for link in links.values()]
    for t in closers:
        t.start()
    for t in closers:
        t.join(30)
    for s in listeners.values():
        s.close()
    return seen, errs
