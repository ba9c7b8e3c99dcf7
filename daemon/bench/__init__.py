"""`mrm-push bench`: webhook ingest, webhook to tablet latency, WebSocket fan-out, FCM sends."""
