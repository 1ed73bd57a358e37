"""The gRPC control API of a running training job.

``target``  the interface the training driver implements (``ControlTarget``)
``server``  ``ControlServer``: serves a target, with token auth and optional TLS
``client``  ``ControlClient``: one method per RPC, plain dicts back
``cli``     the ``harpo status | modulator | scale | checkpoint | pause | resume | stop`` commands
``generate``  rebuilds the committed ``control_pb2*`` modules from ``control.proto``
"""
