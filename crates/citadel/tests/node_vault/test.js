// Drives a Citadel cluster with node-vault, a Vault client for Node.js.
//
// Run by the Rust integration test `node_vault_client_drives_a_cluster` with VAULT_ADDR (the
// leader), VAULT_ADDR_FOLLOWER, VAULT_TOKEN (root) and VAULT_CACERT set. Every step asserts;
// the script exits non-zero on the first difference from Vault's behaviour.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const nodeVault = require('node-vault');

const ca = fs.readFileSync(process.env.VAULT_CACERT);
const client = (endpoint, token) => nodeVault({ endpoint, token, requestOptions: { ca } });
const leaderAddr = process.env.VAULT_ADDR;
const followerAddr = process.env.VAULT_ADDR_FOLLOWER;
const root = client(leaderAddr, process.env.VAULT_TOKEN);
const follower = client(followerAddr, process.env.VAULT_TOKEN);

async function refused(promise, status, what) {
    try {
        await promise;
    } catch (e) {
        assert.equal(e.response && e.response.statusCode, status, `${what}: ${e.message}`);
        return e;
    }
    assert.fail(`${what} succeeded; expected HTTP ${status}`);
}

async function step(name, fn) {
    try {
        await fn();
        console.log(`ok: ${name}`);
    } catch (e) {
        console.log(`FAILED: ${name}`);
        throw e;
    }
}

async function main() {
    await step('health', async () => {
        const health = await root.health();
        assert.equal(health.initialized, true);
        assert.equal(health.sealed, false);
        assert.equal(health.standby, false);
        // node-vault resolves sys/health whatever the code: a follower answers 429 (standby).
        const standby = await follower.health();
        assert.equal(standby.standby, true, JSON.stringify(standby));
        const ok = await follower.health({ standbyok: true });
        assert.equal(ok.sealed, false);
    });

    await step('leader and ha-status', async () => {
        const leader = await root.leader();
        assert.equal(leader.is_self, true);
        assert.ok(Date.parse(leader.active_time) > Date.parse('2000-01-01'), leader.active_time);
        const seen = await follower.leader();
        assert.equal(seen.is_self, false);
        assert.equal(seen.active_time, '0001-01-01T00:00:00Z', 'a standby reports the zero time, as Vault');
        assert.equal(seen.leader_address, leader.leader_address);
        const ha = await root.read('sys/ha-status');
        assert.equal(ha.nodes.length, 3, JSON.stringify(ha));
        assert.equal(ha.nodes.filter((n) => n.active_node).length, 1, JSON.stringify(ha));
        // A follower answers with the leader's view, as Vault's standbys do.
        const fromFollower = await follower.read('sys/ha-status');
        assert.deepEqual(fromFollower.nodes.map((n) => [n.hostname, n.active_node]), ha.nodes.map((n) => [n.hostname, n.active_node]));
        for (const n of ha.nodes) {
            assert.ok(n.hostname && n.api_address && n.cluster_address && n.version, JSON.stringify(n));
            assert.ok(n.active_node || !Number.isNaN(Date.parse(n.last_echo)), JSON.stringify(n));
        }
    });

    await step('policies', async () => {
        const rules = 'path "secret/data/node/*" { capabilities = ["create", "read", "update", "list"] }\n'
            + 'path "secret/metadata/node/*" { capabilities = ["list"] }';
        await root.addPolicy({ name: 'node-app', rules });
        const read = await root.getPolicy({ name: 'node-app' });
        assert.equal(read.rules, rules);
        const list = await root.policies();
        assert.ok(list.policies.includes('node-app'), JSON.stringify(list));
        await root.addPolicy({ name: 'node-temp', rules });
        await root.removePolicy({ name: 'node-temp' });
        assert.ok(!(await root.policies()).policies.includes('node-temp'));
        // Through the ACL path too (Vault's current API).
        await root.write('sys/policies/acl/node-acl', { policy: rules });
        assert.equal((await root.read('sys/policies/acl/node-acl')).data.policy, rules);
        assert.ok((await root.list('sys/policies/acl')).data.keys.includes('node-acl'));
        await root.delete('sys/policies/acl/node-acl');
    });

    await step('tokens', async () => {
        const created = await root.tokenCreate({ policies: ['node-app'], ttl: '1h', display_name: 'node' });
        const token = created.auth.client_token;
        assert.ok(token, JSON.stringify(created));
        assert.deepEqual([...created.auth.policies].sort(), ['default', 'node-app']);
        // tokenCreate is a token source: node-vault switched to the new token. Back to root.
        root.token = process.env.VAULT_TOKEN;
        const looked = await root.tokenLookup({ token });
        assert.equal(looked.data.id, token);
        assert.equal(looked.data.display_name, 'token-node');
        const child = client(leaderAddr, token);
        const self = await child.tokenLookupSelf();
        assert.equal(self.data.id, token);
        assert.ok(self.data.policies.includes('node-app'));
        const renewedSelf = await child.tokenRenewSelf({ increment: '2h' });
        assert.equal(renewedSelf.auth.client_token, token);
        assert.equal(renewedSelf.auth.lease_duration, 7200);
        const renewed = await root.tokenRenew({ token, increment: 3600 });
        assert.equal(renewed.auth.client_token, token);
        root.token = process.env.VAULT_TOKEN;
        await root.tokenRevoke({ token });
        await refused(child.tokenLookupSelf(), 403, 'a revoked token');
        const other = (await root.tokenCreate({ ttl: '10m' })).auth.client_token;
        root.token = process.env.VAULT_TOKEN;
        const otherClient = client(followerAddr, other);
        assert.equal((await otherClient.tokenLookupSelf()).data.id, other);
        await otherClient.tokenRevokeSelf();
        await refused(otherClient.tokenLookupSelf(), 403, 'a self-revoked token');
    });

    await step('userpass', async () => {
        const auths = await root.auths();
        assert.ok('userpass/' in auths.data, JSON.stringify(auths));
        // A script written for Vault enables userpass first; in Citadel it is always there, so
        // enabling it at userpass/ succeeds with nothing to do (api/mounts.rs, enable_auth).
        await root.enableAuth({ mount_point: 'userpass', type: 'userpass', description: 'users' });
        await root.write('auth/userpass/users/node-user', { password: 'node-password-1', policies: 'node-app' });
        const user = client(leaderAddr);
        const login = await user.userpassLogin({ username: 'node-user', password: 'node-password-1' });
        assert.ok(login.auth.client_token);
        assert.ok(login.auth.policies.includes('node-app'), JSON.stringify(login.auth));
        assert.equal(user.token, login.auth.client_token, 'node-vault takes the login token');
        await user.write('secret/data/node/own', { data: { k: 'v' } });
        await refused(user.read('secret/data/elsewhere'), 403, 'a read outside the policy');
        await refused(client(leaderAddr).userpassLogin({ username: 'node-user', password: 'wrong-password' }), 400, 'a wrong password');
    });

    await step('mounts', async () => {
        await root.mount({ mount_point: 'secret2', type: 'kv', options: { version: 2 }, description: 'node' });
        const mounts = await root.mounts();
        assert.equal(mounts.data['secret2/'].type, 'kv', JSON.stringify(mounts.data['secret2/']));
        assert.equal(String(mounts.data['secret2/'].options.version), '2');
    });

    await step('kv v2', async () => {
        const written = await root.write('secret2/data/app/db', { data: { password: 'p1' } });
        assert.equal(written.data.version, 1);
        await root.write('secret2/data/app/db', { data: { password: 'p2' }, options: { cas: 1 } });
        await refused(root.write('secret2/data/app/db', { data: { password: 'x' }, options: { cas: 1 } }), 400, 'a stale cas');
        const read = await root.read('secret2/data/app/db');
        assert.deepEqual(read.data.data, { password: 'p2' });
        assert.equal(read.data.metadata.version, 2);
        assert.deepEqual((await follower.read('secret2/data/app/db?version=1')).data.data, { password: 'p1' });
        await follower.write('secret2/data/app/cache', { data: { url: 'redis://' } });
        assert.deepEqual((await root.list('secret2/metadata/app')).data.keys, ['cache', 'db']);
        const viaQuery = client(leaderAddr, process.env.VAULT_TOKEN);
        viaQuery.noCustomHTTPVerbs = true;
        assert.deepEqual((await viaQuery.list('secret2/metadata/app')).data.keys, ['cache', 'db']);
        await root.delete('secret2/data/app/cache');
        await refused(root.read('secret2/data/app/cache'), 404, 'a deleted secret');
        await root.delete('secret2/metadata/app/cache');
        assert.deepEqual((await root.list('secret2/metadata/app')).data.keys, ['db']);
        await root.destroySecretVersions({ mount_point: 'secret2', path: 'app/db', versions: [1] });
        assert.equal((await root.read('secret2/metadata/app/db')).data.versions['1'].destroyed, true);
    });

    await step('unmount', async () => {
        await root.unmount({ mount_point: 'secret2' });
        assert.ok(!('secret2/' in (await root.mounts()).data));
    });

    console.log('node-vault: all checks passed');
}

main().catch((e) => {
    console.error(e && e.response ? `${e.message}\n${JSON.stringify(e.response)}` : e);
    process.exit(1);
});
