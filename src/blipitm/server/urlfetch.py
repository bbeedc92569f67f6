"""Fetching image URLs without becoming an SSRF proxy.

A URL names a host; what matters is the address we connect to. So every hop is: parse, check the
scheme (http/https) and the optional host allowlist, resolve the host, refuse the hop if ANY
resolved address is not a public unicast address, then connect to the checked address itself
(the URL's host replaced by the IP, the original ``Host`` header and TLS SNI kept) so that a
second DNS answer cannot swap in an internal address (DNS rebinding). Redirects are not followed
by the HTTP client; each ``Location`` goes through the same checks. Bodies are streamed under a byte
cap, with ``identity`` encoding so a compressed bomb cannot expand past it, and the whole fetch has
a deadline on top of the connect/read timeouts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

import httpx

from blipitm.server.errors import APIError, ErrorCode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

# 100.64.0.0/10 (carrier-grade NAT, RFC 6598): not "private" to Python's ipaddress, not public.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# 192.0.0.0/24 (IETF protocol assignments): Python's is_global varies by version inside it; no image
# server lives there, so all of it is refused.
_IETF = ipaddress.ip_network("192.0.0.0/24")
# 64:ff9b::/96 (NAT64 well-known prefix, RFC 6052): the last 32 bits are an IPv4 address that a
# NAT64 gateway would connect to; Python calls the whole prefix global.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# ::/96 "IPv4-compatible" IPv6 (deprecated, RFC 4291): some stacks route ::a.b.c.d to a.b.c.d.
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


def forbidden_reason(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why connecting to ``ip`` is refused, or None if it is a public unicast address.

    IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64)
    are judged by the address they carry as well, since traffic may end up there.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        inner = forbidden_reason(ip.ipv4_mapped, allow_loopback=allow_loopback)
        return f"IPv4-mapped {inner}" if inner else None
    if ip.is_loopback:
        return None if allow_loopback else f"a loopback address ({ip})"
    if isinstance(ip, ipaddress.IPv6Address):
        reason = _ipv6_reason(ip)
        if reason:
            return reason
    for kind, describe in _NOT_PUBLIC:
        if kind(ip):
            return describe.format(ip=ip)
    return None


def _ipv6_reason(ip: ipaddress.IPv6Address) -> str | None:
    """What is wrong with an IPv6 (not loopback, not IPv4-mapped) beyond the generic kinds."""
    if ip in _V4_COMPATIBLE and not ip.is_unspecified:
        return "an IPv4-compatible IPv6 address (deprecated; may route to IPv4)"
    embedded: list[ipaddress.IPv4Address] = []
    if ip.sixtofour is not None:
        embedded.append(ip.sixtofour)
    if ip.teredo is not None:
        embedded.extend(ip.teredo)
    if ip in _NAT64:
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for inner_ip in embedded:
        inner = forbidden_reason(inner_ip, allow_loopback=False)
        if inner:
            return f"an IPv6 address embedding {inner}"
    return "a site-local IPv6 address" if ip.is_site_local else None


# Checked in order after loopback; the first kind that matches names the refusal.
_NOT_PUBLIC: list[tuple[Callable[[IPAddress], bool], str]] = [
    (lambda ip: ip.is_unspecified, "the unspecified address {ip}"),
    (
        lambda ip: ip.is_link_local,
        "a link-local address ({ip}; this includes cloud metadata endpoints)",
    ),
    (lambda ip: ip.is_multicast, "a multicast address ({ip})"),
    (lambda ip: ip.version == 4 and ip in _CGNAT, "a carrier-grade NAT address ({ip})"),
    (lambda ip: ip.version == 4 and ip in _IETF, "an IETF protocol-assignment address ({ip})"),
    (lambda ip: ip.is_private, "a private address ({ip})"),
    (lambda ip: ip.is_reserved, "a reserved address ({ip})"),
    (lambda ip: not ip.is_global, "not a globally routable address ({ip})"),
]


async def system_resolve(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (the OS resolver, off the event loop)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _refuse(message: str, param: str, code: ErrorCode = ErrorCode.URL_FORBIDDEN) -> APIError:
    return APIError(400, message, code=code, param=param)


class URLFetcher:
    """Fetches image bytes from public http(s) URLs; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_s: float,
        max_redirects: int,
        allowlist: Sequence[str] = (),
        allow_loopback: bool = False,
        resolver: Resolver = system_resolve,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.allowlist = frozenset(_normalise_host(h) for h in allowlist)
        self.allow_loopback = allow_loopback
        self._resolve = resolver
        # trust_env=False: a proxy from the environment would connect by name and undo the pin.
        # No keep-alive: a pooled TLS connection is keyed by IP and could be reused for another
        # host name on the same address.
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, param: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url, param)
        except TimeoutError:
            raise _refuse(
                f"fetching the image took longer than {self.timeout_s:g}s",
                param,
                code=ErrorCode.URL_FETCH_FAILED,
            ) from None
        except httpx.HTTPError as e:
            raise _refuse(
                f"cannot fetch the image: {type(e).__name__}",
                param,
                code=ErrorCode.URL_FETCH_FAILED,
            ) from None

    async def _fetch(self, url: str, param: str) -> bytes:
        current = url
        for _hop in range(self.max_redirects + 1):
            target, headers, extensions = await self._checked_target(current, param)
            request = self._client.build_request(
                "GET", target, headers=headers, extensions=extensions
            )
            response = await self._client.send(request, stream=True)
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    current = str(httpx.URL(current).join(location))
                    continue
                if response.status_code != 200:
                    raise _refuse(
                        f"the image URL answered HTTP {response.status_code}",
                        param,
                        code=ErrorCode.URL_FETCH_FAILED,
                    )
                return await self._read_capped(response, param)
            finally:
                await response.aclose()
        raise _refuse(
            f"more than {self.max_redirects} redirects",
            param,
            code=ErrorCode.URL_TOO_MANY_REDIRECTS,
        )

    async def _checked_target(
        self, url: str, param: str
    ) -> tuple[httpx.URL, dict[str, str], dict[str, object]]:
        parsed, host = self._checked_url(url, param)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        target = parsed.copy_with(host=await self._public_address(host, port, param))
        headers = {"Host": parsed.netloc.decode("ascii"), "Accept-Encoding": "identity"}
        extensions: dict[str, object] = {}
        if parsed.scheme == "https":
            extensions["sni_hostname"] = host  # certificate checked against the name, not the IP
        return target, headers, extensions

    def _checked_url(self, url: str, param: str) -> tuple[httpx.URL, str]:
        """The parsed URL and its lower-case host, if scheme, credentials and host are allowed."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise _refuse("not a valid URL", param, code=ErrorCode.INVALID_URL) from None
        if parsed.scheme not in ("http", "https"):
            raise _refuse(
                f"URL scheme {parsed.scheme!r} is not allowed; only http and https are",
                param,
                code=ErrorCode.URL_SCHEME_NOT_ALLOWED,
            )
        if parsed.userinfo:
            raise _refuse("URLs with credentials are not allowed", param)
        host = parsed.raw_host.decode("ascii").lower()
        if not host:
            raise _refuse("the URL has no host", param, code=ErrorCode.INVALID_URL)
        if self.allowlist and _normalise_host(host) not in self.allowlist:
            raise _refuse(f"host {host!r} is not in the URL allowlist", param)
        return parsed, host

    async def _public_address(self, host: str, port: int, param: str) -> str:
        """The address to connect to, once every address ``host`` resolves to is public."""
        try:
            addresses = await self._resolve(host, port)
        except (OSError, UnicodeError):
            raise _refuse(
                f"cannot resolve host {host!r}", param, code=ErrorCode.URL_FETCH_FAILED
            ) from None
        if not addresses:
            raise _refuse(f"host {host!r} has no address", param, code=ErrorCode.URL_FETCH_FAILED)
        for address in addresses:
            # A scoped IPv6 address ("fe80::1%eth0") is link-local whatever its scope.
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            reason = forbidden_reason(ip, allow_loopback=self.allow_loopback)
            if reason:
                raise _refuse(f"host {host!r} resolves to {reason}; refused", param)
        return addresses[0].split("%", 1)[0]

    async def _read_capped(self, response: httpx.Response, param: str) -> bytes:
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise _refuse(
                f"the image URL sent Content-Encoding {encoding!r}; only identity is accepted",
                param,
                code=ErrorCode.URL_FETCH_FAILED,
            )
        too_large = APIError(
            413,
            f"the image at the URL is larger than the limit of {self.max_bytes} bytes",
            code=ErrorCode.IMAGE_TOO_LARGE,
            param=param,
        )
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)


def _normalise_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host
