"""FCM HTTP v1 stand-in: `messages:send` with FCM's validation and error shapes, plus controls."""

from daemon.emulator.fcm.emulator import FcmEmulator, TokenChecker
from daemon.emulator.fcm.failures import FAILURES, TOKEN_STATES, TokenState
from daemon.emulator.fcm.message import MAX_DATA_BYTES, FcmApiError, data_size, validate_request
from daemon.emulator.fcm.send import FCM_SCOPE

__all__ = [
    "FAILURES",
    "FCM_SCOPE",
    "MAX_DATA_BYTES",
    "TOKEN_STATES",
    "FcmApiError",
    "FcmEmulator",
    "TokenChecker",
    "TokenState",
    "data_size",
    "validate_request",
]
