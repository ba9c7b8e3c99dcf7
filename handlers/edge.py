"""The request's edge, before routing: who is calling, and whether its body can be read.

Once for every route: the caller comes from the trusted proxies, the body framing from
Content-Length and Transfer-Encoding."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from tornado import httputil, web

from handlers.base import ApiError, BaseHandler, framing_refusal

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# What the caller is called when a trusted proxy hands over something that is no address:
# never an address, so that it matches no CIDR (auth.legacy_allow_from) and logs no made-up text.
UNKNOWN_CLIENT = "unknown"


def parse_address(text: str) -> IpAddress | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


class TrustedProxies:
    """`server.trusted_proxies`: whose X-Forwarded-For, X-Real-Ip and X-Forwarded-Proto count."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks: tuple[IpNetwork, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in cidrs
        )

    def trusts(self, address: IpAddress | None) -> bool:
        return address is not None and any(address in network for network in self.networks)

    def client(self, remote_ip: str, headers: httputil.HTTPHeaders) -> tuple[str, str | None]:
        """(the caller's address, the scheme it used or None for the socket's own) of a request
        that came from `remote_ip` with these headers."""
        peer = parse_address(remote_ip)
        if not self.trusts(peer):
            return remote_ip, None  # whatever it says about others: it is the caller
        scheme = None
        protos = ",".join(headers.get_list("X-Forwarded-Proto")).split(",")
        if protos[-1].strip().lower() in ("http", "https"):
            scheme = protos[-1].strip().lower()  # the nearest proxy's word
        forwarded = [
            hop.strip()
            for value in headers.get_list("X-Forwarded-For")
            for hop in value.split(",")
            if hop.strip()
        ]
        if not forwarded:
            real = headers.get("X-Real-Ip")
            if real is None:
                return remote_ip, scheme
            forwarded = [real]
        # Each proxy appends the address it saw: from the right, the first one that is not a
        # trusted proxy is the caller; whatever lies left of it, the caller wrote itself.
        for hop in reversed(forwarded):
            address = parse_address(hop)
            if address is None:
                return UNKNOWN_CLIENT, scheme
            if not self.trusts(address):
                return str(address), scheme
        return str(parse_address(forwarded[0])), scheme  # proxies all the way: the first


class RefusedHandler(BaseHandler):
    """A request refused at the edge, before routing (its error given by the application)."""

    auth = "public"

    def initialize(self, error: ApiError) -> None:
        self.error = error

    async def prepare(self) -> None:
        raise self.error


class EdgeApplication(web.Application):
    """The Tornado application with the edge rules applied before any handler is chosen, the
    WebSocket and the webhook included. The HTTPServer runs with xheaders=False: this is the
    only place forwarded headers are read."""

    def __init__(
        self,
        handlers: Any,
        *,
        trusted_proxies: TrustedProxies,
        max_body_size: int,
        **settings: Any,
    ) -> None:
        super().__init__(handlers, **settings)
        self.trusted_proxies = trusted_proxies
        self.max_body_size = max_body_size

    def find_handler(self, request: httputil.HTTPServerRequest, **kwargs: Any) -> Any:
        remote_ip, scheme = self.trusted_proxies.client(request.remote_ip or "", request.headers)
        request.remote_ip = remote_ip
        if scheme is not None:
            request.protocol = scheme
        # Before Tornado reads the body (it would answer a bare 400 for framing it cannot
        # read, and int() has a digit limit): an answer in our shape, for every route.
        refusal = framing_refusal(request.headers, self.max_body_size)
        if refusal is not None:
            return self.get_handler_delegate(request, RefusedHandler, {"error": refusal})
        return super().find_handler(request, **kwargs)
