"""SecAgg+ (Bell et al., CCS 2020) as transport-free code: the server learns the weighted sum of
the surviving clients' clipped uploads and nothing about any one of them (honest-but-curious
server, colluding clients below the threshold). docs/secure-aggregation.md has the threat model.

Modules: ``primitives`` (X25519, HKDF, AES-GCM, Shamir, AES-CTR PRG), ``encoding`` (fixed point
in Z_2^bits), ``graph`` (Harary neighbour graph), ``messages`` (typed, checked records),
``client`` and ``server`` (the two state machines), ``driver`` (one instance over any transport).
"""

from .client import ClientPolicy, SecAggClient, SecAggRefusal, respond
from .driver import Exchange, SecAggOutcome, run_instance
from .encoding import EncodingError, FixedPoint
from .messages import STAGES, MessageError
from .server import RoundAborted, SecAggParams, SecAggResult, SecAggServer, StageStats

__all__ = ["STAGES", "ClientPolicy", "EncodingError", "Exchange", "FixedPoint", "MessageError",
           "RoundAborted", "SecAggClient", "SecAggOutcome", "SecAggParams", "SecAggRefusal",
           "SecAggResult", "SecAggServer", "StageStats", "respond", "run_instance"]
