"""Drives a Citadel node with hvac, the maintained Python client for HashiCorp Vault.

Run by the Rust integration test `hvac_python_client_drives_the_api` with VAULT_ADDR,
VAULT_TOKEN and VAULT_CACERT set. Every step asserts; the script exits non-zero on the first
difference from Vault's behaviour.
"""
import os
import sys

import hvac
from hvac import exceptions

addr, token, ca = os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"], os.environ["VAULT_CACERT"]
client = hvac.Client(url=addr, token=token, verify=ca)
kv = client.secrets.kv.v2


def expect(exc, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc:
        return
    raise AssertionError(f"{fn.__name__} did not raise {exc.__name__}")


assert client.is_authenticated()
assert client.sys.is_initialized()
assert not client.sys.is_sealed()
health = client.sys.read_health_status(method="GET")
assert health["initialized"] and not health["sealed"], health
assert client.sys.read_seal_status()["type"] == "shamir"
leader = client.sys.read_leader_status()
assert leader["is_self"] is True
# The active node says when it became active (Vault's Go client parses it as a time).
assert leader["active_time"].startswith("20"), leader
ha = client.adapter.get("/v1/sys/ha-status")
assert [n["active_node"] for n in ha["nodes"]] == [True], ha
assert ha["nodes"][0]["api_address"] and ha["nodes"][0]["cluster_address"].startswith("https://"), ha

# KV v2
assert kv.create_or_update_secret(path="hvac/app", secret={"pw": "s1"})["data"]["version"] == 1
assert kv.read_secret_version(path="hvac/app", raise_on_deleted_version=True)["data"]["data"] == {"pw": "s1"}
kv.create_or_update_secret(path="hvac/app", secret={"pw": "s2"}, cas=1)
expect(exceptions.InvalidRequest, kv.create_or_update_secret, path="hvac/app", secret={"pw": "x"}, cas=1)
kv.patch(path="hvac/app", secret={"user": "admin"})
assert kv.read_secret_version(path="hvac/app", raise_on_deleted_version=True)["data"]["data"] == {"pw": "s2", "user": "admin"}
assert kv.read_secret_version(path="hvac/app", version=1, raise_on_deleted_version=True)["data"]["data"] == {"pw": "s1"}
assert kv.list_secrets(path="hvac")["data"]["keys"] == ["app"]
meta = kv.read_secret_metadata(path="hvac/app")["data"]
assert meta["current_version"] == 3, meta
kv.update_metadata(path="hvac/app", max_versions=5, custom_metadata={"owner": "ops"})
assert kv.read_secret_metadata(path="hvac/app")["data"]["max_versions"] == 5
kv.delete_latest_version_of_secret(path="hvac/app")
expect(exceptions.InvalidPath, kv.read_secret_version, path="hvac/app", raise_on_deleted_version=True)
kv.undelete_secret_versions(path="hvac/app", versions=[3])
assert kv.read_secret_version(path="hvac/app", raise_on_deleted_version=True)["data"]["data"]["user"] == "admin"
kv.destroy_secret_versions(path="hvac/app", versions=[1])
assert kv.read_secret_metadata(path="hvac/app")["data"]["versions"]["1"]["destroyed"] is True
kv.delete_metadata_and_all_versions(path="hvac/app")
expect(exceptions.InvalidPath, kv.read_secret_version, path="hvac/app", raise_on_deleted_version=True)
kv.configure(max_versions=20, mount_point="secret")
assert kv.read_configuration(mount_point="secret")["data"]["max_versions"] == 20

# Mounts and auth methods
client.sys.enable_secrets_engine(backend_type="kv", path="team", options={"version": "2"})
assert "team/" in client.sys.list_mounted_secrets_engines()["data"]
kv.create_or_update_secret(path="t", secret={"a": "b"}, mount_point="team")
client.sys.disable_secrets_engine(path="team")
assert "team/" not in client.sys.list_mounted_secrets_engines()["data"]
assert "userpass/" in client.sys.list_auth_methods()["data"]

# Policies (both the ACL and the legacy paths)
rules = 'path "secret/data/hvac/*" { capabilities = ["create", "read", "update"] }'
client.sys.create_or_update_acl_policy(name="hvac-app", policy=rules)
assert client.sys.read_acl_policy(name="hvac-app")["data"]["policy"] == rules
assert "hvac-app" in client.sys.list_acl_policies()["data"]["keys"]
client.sys.create_or_update_policy(name="legacy", policy=rules)
assert "legacy" in client.sys.list_policies()["data"]["policies"]
client.sys.delete_policy(name="legacy")

# Userpass and tokens
client.auth.userpass.create_or_update_user(username="hvac-user", password="hvac-password-1", policies=["hvac-app"])
user = hvac.Client(url=addr, verify=ca)
login = user.auth.userpass.login(username="hvac-user", password="hvac-password-1")
assert "hvac-app" in login["auth"]["policies"]
user.secrets.kv.v2.create_or_update_secret(path="hvac/own", secret={"k": "v"})
expect(exceptions.Forbidden, user.secrets.kv.v2.read_secret_version, path="other", raise_on_deleted_version=True)
expect(exceptions.InvalidRequest, hvac.Client(url=addr, verify=ca).auth.userpass.login, username="hvac-user", password="wrong-password")

child = client.auth.token.create(policies=["hvac-app"], ttl="1h")["auth"]["client_token"]
child_client = hvac.Client(url=addr, token=child, verify=ca)
assert child_client.auth.token.lookup_self()["data"]["policies"] == ["hvac-app", "default"]
assert child_client.auth.token.lookup_self()["data"]["id"] == child
renewed = child_client.auth.token.renew_self(increment="2h")["auth"]
assert renewed["lease_duration"] == 7200 and renewed["client_token"] == child, renewed
assert client.auth.token.lookup(child)["data"]["display_name"] == "token-token"
assert client.auth.token.lookup(child)["data"]["id"] == child
child_client.auth.token.revoke_self()
assert not child_client.is_authenticated()

# Keyring
term = client.sys.get_encryption_key_status()["data"]["term"]
client.sys.rotate_encryption_key()
assert client.sys.get_encryption_key_status()["data"]["term"] == term + 1
assert user.secrets.kv.v2.read_secret_version(path="hvac/own", raise_on_deleted_version=True)["data"]["data"] == {"k": "v"}

print("hvac: all checks passed")
