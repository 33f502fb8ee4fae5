"""The operator's allow-list of upstreams (`--allowed-upstream`, `control.upstreams`): which URLs each kind of entry
lets an `openai` engine have, that link-local and metadata addresses pass only an entry inside them, and that a bad
entry is refused at start naming the flag. (Through a real gateway: tests/security/test_admin_routes.py.)"""

from __future__ import annotations

import pytest

from sagellm.common.errors import FieldError
from sagellm.gateway.control.upstreams import UpstreamAllowList
from sagellm.gateway.http.errors import ApiError


@pytest.mark.parametrize(
    ("entries", "allowed", "refused"),
    [
        (["127.0.0.1"], ["http://127.0.0.1:8000/v1", "https://127.0.0.1"], ["http://127.0.0.2", "http://localhost:80"]),
        (["gpu-3.cluster:8000"], ["http://GPU-3.cluster.:8000/v1"], ["http://gpu-3.cluster:8001", "http://gpu-3"]),
        (["10.0.0.0/24:8000"], ["http://10.0.0.7:8000"], ["http://10.0.1.7:8000", "http://10.0.0.7:9000"]),
        (["[fd00::/8]"], ["http://[fd00::1]:1234"], ["http://[fe00::1]:1234", "http://10.0.0.1"]),
        (["example.com"], ["http://example.com/v1"], ["http://80:example.com@evil.com/"]),  # the host is evil.com
        (
            ["0.0.0.0/0", "::/0"],
            ["http://8.8.8.8", "http://[2001:db8::1]/"],
            [
                "http://169.254.169.254/latest",
                "http://[fe80::1]/",
                "http://[fd00:ec2::254]/",
                "http://100.100.100.200/",
                "http://[::ffff:169.254.169.254]/",
                "http://2852039166/",  # the same address, other spellings
            ],
        ),
        (["169.254.169.254"], ["http://169.254.169.254/latest"], ["http://169.254.169.253/"]),  # listed itself
        ([], [], ["http://127.0.0.1:8000"]),  # the default: nowhere
    ],
)
def test_an_entry_allows_its_hosts_networks_and_ports_only(entries, allowed, refused):
    upstreams = UpstreamAllowList(entries)
    assert [url for url in allowed if upstreams.allows(url)] == allowed
    assert [url for url in refused if upstreams.allows(url)] == []


def test_a_refused_url_is_a_403_naming_url_and_what_is_allowed():
    with pytest.raises(ApiError) as raised:
        UpstreamAllowList(["127.0.0.1:8000"]).check("http://169.254.169.254/")
    error = raised.value
    assert (error.http_status, error.param, error.code) == (403, "url", "upstream_not_allowed")
    assert "(allowed: 127.0.0.1:8000)" in error.message and "--allowed-upstream" in error.message
    for url in ("http://user@127.0.0.1:8000", "http://127.0.0.1:8000/v1?next=x", "http://127.0.0.1:8000/#f"):
        with pytest.raises(ApiError) as raised:
            UpstreamAllowList(["127.0.0.1:8000"]).check(url)
        assert (raised.value.http_status, raised.value.param) == (400, "url")


@pytest.mark.parametrize("entry", ["", "a host", "h:0", "h:65536", "h:x", "[::1", "[::1]8000", "http://h"])
def test_a_bad_entry_is_refused_naming_the_flag(entry):
    with pytest.raises(FieldError) as raised:
        UpstreamAllowList([entry])
    assert raised.value.field == "allowed_upstreams" and "--allowed-upstream" in str(raised.value)
