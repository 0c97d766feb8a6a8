"""The migration protocol as pure state machines (sans-IO).

``source.Source`` is the moving side (A) and ``target.Target`` the receiving side (B).
Each takes events (an answer, a refusal, silence, a local step's result) and returns the
next action (ask the steering node or the peer, freeze, release, resume, discard...), so
every path, rollback and in-doubt case runs in a unit test without a socket. The agent's
asyncio adapters (``pysteer.agent.source``, ``pysteer.agent.imports``) carry out the actions.
"""
