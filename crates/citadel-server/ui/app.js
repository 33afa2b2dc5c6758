// Citadel's web console (§11.1). No framework and no build step: the DOM is built from text
// nodes (never from HTML strings), every call goes to this node's /v1/ API with the operator's
// token, and the token lives in this tab's session storage only.
'use strict';

const TOKEN_KEY = 'citadel-token';
/**
 * How often the Cluster and Nodes pages ask for the HA table (each ask is an audited request;
 * the leader is learnt sooner from the event stream). Not while the tab is hidden.
 */
const POLL_MS = 1000;
/** How often the Alerts page refreshes. */
const ALERTS_POLL_MS = 5000;
let token = sessionStorage.getItem(TOKEN_KEY);
/** Stops the current page's polling and streams. */
let leavePage = () => {};

// ---- DOM and API helpers ----

function $(id) {
  return document.getElementById(id);
}

/** An element with attributes (functions become listeners) and children (strings become text). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (typeof value === 'function') node.addEventListener(name, value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function say(text, isError = false) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('error', isError);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the API; resolves to the JSON body (or the Response when `raw`), throws ApiError. */
async function api(method, path, body, { timeout = 5000, raw = false } = {}) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeout);
  const headers = {};
  if (token) headers['X-Vault-Token'] = token;
  let payload;
  if (body instanceof Blob) {
    payload = body;
    headers['Content-Type'] = 'application/octet-stream';
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  }
  try {
    const reply = await fetch('/v1/' + path, { method, headers, body: payload, signal: abort.signal, cache: 'no-store' });
    if (raw && reply.ok) return reply;
    const text = await reply.text();
    let json = {};
    try {
      json = text ? JSON.parse(text) : {};
    } catch {
      json = { errors: [text.slice(0, 200)] };
    }
    if (!reply.ok) {
      const message = (json.errors || []).join('; ') || reply.statusText || 'request failed';
      throw new ApiError(reply.status, message);
    }
    return json;
  } catch (e) {
    if (e.name === 'AbortError') throw new ApiError(0, 'this node did not answer in time');
    if (e instanceof ApiError) throw e;
    throw new ApiError(0, 'this node cannot be reached');
  } finally {
    clearTimeout(timer);
  }
}

function dataOf(reply) {
  return reply && reply.data !== undefined ? reply.data : reply;
}

function formatTime(ms) {
  if (!ms) return '';
  return new Date(ms).toLocaleString();
}

function ago(ms) {
  if (ms === null || ms === undefined) return 'never';
  if (ms < 1000) return ms + ' ms ago';
  return (ms / 1000).toFixed(1) + ' s ago';
}

// ---- Login ----

async function logIn(candidate) {
  token = candidate;
  try {
    await api('GET', 'auth/token/lookup-self');
  } catch (e) {
    token = null;
    throw e;
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
}

function logOut() {
  leavePage();
  leavePage = () => {};
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  show();
}

function wireLogin() {
  $('token-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const field = $('token');
    try {
      await logIn(field.value.trim());
      field.value = '';
      say('');
      show();
    } catch (e) {
      say('Login refused: ' + e.message, true);
    }
  });
  $('userpass-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const user = $('username').value.trim();
    try {
      const reply = await api('POST', 'auth/userpass/login/' + encodeURIComponent(user), {
        password: $('password').value,
      });
      $('password').value = '';
      await logIn(reply.auth.client_token);
      say('');
      show();
    } catch (e) {
      say('Login refused: ' + e.message, true);
    }
  });
  $('logout').addEventListener('click', logOut);
}

// ---- Shared: the HA table, the event stream, the banner ----

/** The HA table (§5.6) as a follower or the leader answers it. */
async function haStatus() {
  return dataOf(await api('GET', 'sys/ha/status', undefined, { timeout: 1500 }));
}

/** This node's own view: health answers without a token, in any state. */
async function health() {
  const reply = await fetch('/v1/sys/health?standbyok=true&haunhealthycode=200&sealedcode=200&inactivecode=200', {
    cache: 'no-store',
  });
  return reply.json();
}

function showBanner(text) {
  const banner = $('banner');
  banner.textContent = text || '';
  banner.hidden = !text;
}

async function refreshBanner() {
  try {
    const h = await health();
    $('node-name').textContent = 'Connected to node ' + (h.node_id ?? '') + (h.ha_mode ? ' (' + h.ha_mode + ')' : '');
    if (h.sealed) showBanner('This node is sealed: it serves nothing until it is unsealed.');
    else if (h.ha_mode === 'read_only')
      showBanner('Read-only mode: this node has no leader. It serves reads from its own copy and refuses writes.');
    else if (h.inactive) showBanner('This node is inactive: an operator deactivated it.');
    else showBanner('');
    return h;
  } catch {
    showBanner('This node does not answer.');
    return null;
  }
}

/**
 * Follows `sys/events` (newline-delimited JSON) until stopped, reconnecting after a failure.
 * Returns the function that stops it.
 */
function followEvents(onEvent) {
  let stopped = false;
  let abort = null;
  (async () => {
    while (!stopped) {
      abort = new AbortController();
      try {
        const reply = await fetch('/v1/sys/events', { headers: { 'X-Vault-Token': token }, signal: abort.signal });
        if (!reply.ok) throw new Error('status ' + reply.status);
        const reader = reply.body.getReader();
        const decoder = new TextDecoder();
        let buffered = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffered += decoder.decode(value, { stream: true });
          let newline;
          while ((newline = buffered.indexOf('\n')) >= 0) {
            const line = buffered.slice(0, newline).trim();
            buffered = buffered.slice(newline + 1);
            if (line) onEvent(JSON.parse(line));
          }
        }
      } catch {
        // The node went away or the stream was stopped: try again shortly.
      }
      if (!stopped) await sleep(1000);
    }
  })();
  return () => {
    stopped = true;
    if (abort) abort.abort();
  };
}

/** Short words for the HA events of §9.2, as the timeline shows them. */
function describe(event, names) {
  const name = (id) => (names.get(id) ? names.get(id) + ' (' + id + ')' : 'node ' + id);
  switch (event.type) {
    case 'leader_changed':
      return 'New leader: ' + name(event.leader) + ', term ' + event.term;
    case 'node_unreachable':
      return name(event.id) + ' is unreachable';
    case 'node_back':
      return name(event.id) + ' is reachable again';
    case 'read_only_entered':
      return name(event.node) + ' entered read-only mode';
    case 'read_only_left':
      return name(event.node) + ' left read-only mode';
    case 'sealed':
      return name(event.node) + ' was sealed';
    case 'unsealed':
      return name(event.node) + ' was unsealed';
    case 'membership_changed':
      return 'Membership: voters ' + (event.voters || []).join(', ') + '; non-voters ' + (event.learners || []).join(', ');
    case 'lifecycle':
      return 'Operator: ' + event.action + ' ' + name(event.id);
    case 'snapshot_failed':
      return 'Scheduled snapshot ' + event.name + ' failed';
    default:
      return null;
  }
}

/** The HA timeline: the last 24 hours from the audit log, then live events as they come. */
class Timeline {
  constructor(list, names) {
    this.list = list;
    this.names = names;
    this.seen = new Set();
    this.entries = [];
  }

  add(event) {
    const key =
      event.type === 'leader_changed'
        ? 'leader:' + event.term + ':' + event.leader
        : event.type + ':' + (event.id ?? event.node) + ':' + Math.floor(event.time / 2000);
    if (this.seen.has(key)) return;
    if (!describe(event, this.names)) return;
    this.seen.add(key);
    this.entries.push(event);
    this.entries.sort((a, b) => b.time - a.time);
    this.entries = this.entries.slice(0, 200);
    this.render();
  }

  /** Described at each render: names learnt after an event arrived show in it too. */
  render() {
    this.list.replaceChildren(
      ...this.entries.map((e) =>
        el('li', { class: 'event ' + e.type }, el('time', {}, formatTime(e.time)), ' ', describe(e, this.names)),
      ),
    );
  }

  /** Leader and membership changes the leaders audited (kind cluster_event). */
  async loadHistory() {
    try {
      const reply = dataOf(await api('GET', 'sys/audit/events?path=sys/events&since=24h&limit=500'));
      for (const e of reply.events || []) {
        const event = e.event || e;
        if (event.kind !== 'cluster_event') continue;
        const found = /term (\d+), leader (\d+)/.exec(event.detail || '');
        if (event.operation === 'leader_changed' && found) {
          this.add({ type: 'leader_changed', time: event.time, term: Number(found[1]), leader: Number(found[2]) });
        }
      }
    } catch (e) {
      // The timeline still fills from live events; say why the history is missing.
      say('The timeline shows live events only: ' + e.message, true);
    }
  }
}

// ---- Cluster and Nodes ----

const NODE_ACTIONS = [
  { action: 'transfer', label: 'Make leader', confirm: 'Transfer leadership to' },
  { action: 'deactivate', label: 'Deactivate', confirm: 'Deactivate (it keeps replicating, serves nothing, loses its vote)' },
  { action: 'activate', label: 'Activate', confirm: 'Activate' },
  { action: 'resync', label: 'Resync', confirm: 'Resync (discard its copy and fetch the leader’s)' },
  { action: 'rename', label: 'Rename', confirm: null },
  { action: 'remove', label: 'Remove', confirm: 'Remove from the cluster for good' },
];

async function nodeAction(node, action) {
  const who = node.name + ' (' + node.id + ')';
  if (action.action === 'rename') {
    const name = window.prompt('New name for ' + who, node.name);
    if (!name) return;
    await api('POST', 'sys/ha/nodes/' + node.id + '/rename', { name });
  } else {
    if (!window.confirm(action.confirm + ' ' + who + '?')) return;
    if (action.action === 'transfer') await api('POST', 'sys/ha/transfer-leader', { node_id: node.id });
    else await api('POST', 'sys/ha/nodes/' + node.id + '/' + action.action, {});
  }
  say(action.label + ' ' + who + ': done');
}

function nodeRows(nodes, withActions) {
  return nodes.map((n) => {
    const cells = [
      el('td', {}, n.name),
      el('td', {}, String(n.id)),
      el('td', { class: 'role ' + n.role }, n.role),
      el('td', {}, n.suffrage),
      el('td', { class: 'state ' + n.state }, n.state),
      el('td', {}, n.lag === null || n.lag === undefined ? '' : String(n.lag)),
      el('td', {}, ago(n.last_contact_ms)),
    ];
    if (withActions) {
      const buttons = NODE_ACTIONS.map((a) =>
        el('button', {
          type: 'button',
          click: () => nodeAction(n, a).catch((e) => say(a.label + ' failed: ' + e.message, true)),
        }, a.label),
      );
      cells.push(el('td', { class: 'actions' }, buttons));
    }
    return el('tr', { 'data-node': n.id }, cells);
  });
}

function nodesTable(withActions) {
  const headers = ['Name', 'ID', 'Role', 'Suffrage', 'State', 'Lag (entries)', 'Last contact'];
  if (withActions) headers.push('Actions');
  const body = el('tbody', { id: 'nodes' });
  const table = el('table', {}, el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))), body);
  return { table, body };
}

/** The Cluster page (live) and the Nodes page share the HA table's polling. */
function haPage(root, withActions) {
  const summary = el('dl', { class: 'summary' });
  const { table, body } = nodesTable(withActions);
  const names = new Map();
  const field = (label, id) => [el('dt', {}, label), el('dd', { id }, '…')];
  summary.append(
    ...field('Cluster', 'cluster-name'),
    ...field('Leader', 'leader'),
    ...field('Term', 'term'),
    ...field('Health', 'health'),
    ...field('Failure tolerance', 'tolerance'),
    ...field('Shown from', 'source'),
  );
  root.append(el('h2', {}, withActions ? 'Nodes' : 'Cluster'), summary, table);
  let timeline = null;
  if (!withActions) {
    const list = el('ol', { id: 'timeline', class: 'timeline' });
    root.append(el('h3', {}, 'HA events, last 24 hours'), list);
    timeline = new Timeline(list, names);
    timeline.loadHistory();
  }
  // The newest leader known, from the table or (sooner) from the event stream.
  let leader = { term: -1, id: null };
  const showLeader = () => {
    const name = names.get(leader.id);
    $('leader').textContent = leader.id === null ? 'none' : (name || 'node') + ' (' + leader.id + ')';
    $('term').textContent = leader.term < 0 ? '' : String(leader.term);
  };
  const learnLeader = (id, term) => {
    if (term > leader.term || (term === leader.term && id !== null)) {
      leader = { term, id };
      showLeader();
    }
  };
  let alive = true;
  const refresh = async () => {
    await refreshBanner();
    try {
      const status = await haStatus();
      const c = status.cluster;
      for (const n of status.nodes) names.set(n.id, n.name);
      $('cluster-name').textContent = c.name || c.id || '';
      $('health').textContent = c.health;
      $('tolerance').textContent = c.failure_tolerance === null ? 'unknown (no leader)' : String(c.failure_tolerance);
      $('source').textContent = c.source === 'leader' ? 'the leader' : 'this node only: ' + c.note;
      learnLeader(c.leader_id ?? null, c.term);
      body.replaceChildren(...nodeRows(status.nodes, withActions));
      if (timeline) timeline.render();
    } catch (e) {
      $('source').textContent = 'not updated: ' + e.message;
    }
  };
  (async () => {
    while (alive) {
      const started = Date.now();
      if (!document.hidden) await refresh();
      await sleep(Math.max(50, POLL_MS - (Date.now() - started)));
    }
  })();
  const stopEvents = followEvents((event) => {
    if (event.type === 'subscribed' && event.leader !== undefined) learnLeader(event.leader, event.term);
    if (event.type === 'leader_changed') learnLeader(event.leader, event.term);
    if (timeline) timeline.add(event);
  });
  return () => {
    alive = false;
    stopEvents();
  };
}

// ---- Secrets ----

/** A secret's path in a URL: each segment encoded, so '?', '#' and '%' in a key stay in it. */
function encodePath(path) {
  return path.split('/').map(encodeURIComponent).join('/');
}

function secretsPage(root) {
  const mounts = el('select', { id: 'mount' });
  const path = el('input', { id: 'secret-path', value: '' });
  const listing = el('ul', { class: 'listing' });
  const detail = el('div', { class: 'detail' });
  const browse = async () => {
    listing.replaceChildren();
    detail.replaceChildren();
    const prefix = path.value.replace(/^\/+/, '');
    try {
      const reply = await api('GET', mounts.value + 'metadata/' + encodePath(prefix) + '?list=true');
      for (const key of reply.data.keys) {
        const full = prefix + key;
        const open = key.endsWith('/')
          ? () => { path.value = full; browse(); }
          : () => showSecret(full);
        listing.append(el('li', {}, el('button', { type: 'button', class: 'link', click: open }, key)));
      }
    } catch (e) {
      listing.append(el('li', {}, e.status === 404 ? 'Nothing here.' : 'Cannot list: ' + e.message));
    }
  };
  const showSecret = async (name) => {
    detail.replaceChildren(el('h3', {}, name));
    try {
      const meta = (await api('GET', mounts.value + 'metadata/' + encodePath(name))).data;
      const rows = Object.entries(meta.versions || {})
        .sort((a, b) => Number(b[0]) - Number(a[0]))
        .map(([number, v]) => {
          const value = el('pre', { class: 'value' });
          const reveal = el('button', {
            type: 'button',
            click: async () => {
              // Reading a value is an audited request like any other.
              try {
                const reply = await api('GET', mounts.value + 'data/' + encodePath(name) + '?version=' + number);
                value.textContent = JSON.stringify(reply.data.data, null, 2);
              } catch (e) {
                value.textContent = 'Cannot read: ' + e.message;
              }
            },
          }, 'Show value');
          const kept = Number(number) === meta.current_version ? 'current' : 'older version';
          const state = v.destroyed ? 'destroyed' : v.deletion_time ? 'deleted ' + v.deletion_time : kept;
          return el('tr', {}, el('td', {}, number), el('td', {}, v.created_time), el('td', {}, state), el('td', {}, reveal, value));
        });
      detail.append(
        el('table', {},
          el('thead', {}, el('tr', {}, ['Version', 'Created', 'State', 'Value'].map((h) => el('th', { scope: 'col' }, h)))),
          el('tbody', {}, rows)),
      );
    } catch (e) {
      detail.append(el('p', {}, 'Cannot read the metadata: ' + e.message));
    }
  };
  root.append(
    el('h2', {}, 'Secrets'),
    el('form', { class: 'inline', submit: (e) => { e.preventDefault(); browse(); } },
      el('label', { for: 'mount' }, 'Mount'), mounts,
      el('label', { for: 'secret-path' }, 'Path'), path,
      el('button', { type: 'submit' }, 'List')),
    listing,
    detail,
  );
  (async () => {
    try {
      const reply = dataOf(await api('GET', 'sys/mounts'));
      for (const [name, m] of Object.entries(reply)) {
        if (m && String(m.type).startsWith('kv')) mounts.append(el('option', { value: name }, name));
      }
      if (mounts.options.length) browse();
      else listing.append(el('li', {}, 'No KV mount is visible to this token.'));
    } catch (e) {
      listing.append(el('li', {}, 'Cannot list the mounts: ' + e.message));
    }
  })();
  return () => {};
}

// ---- Audit ----

function auditPage(root) {
  const input = (id, label, attrs = {}) => [el('label', { for: id }, label), el('input', { id, ...attrs })];
  const results = el('tbody');
  const verdict = el('p', { id: 'verify-result' });
  const query = async () => {
    const params = new URLSearchParams();
    for (const name of ['node', 'user', 'path', 'since', 'limit']) {
      const value = $('audit-' + name).value.trim();
      if (value) params.set(name, value);
    }
    try {
      const reply = dataOf(await api('GET', 'sys/audit/events?' + params.toString()));
      results.replaceChildren(
        ...(reply.events || []).map((item) => {
          const e = item.event || item;
          return el('tr', {},
            el('td', {}, formatTime(e.time)), el('td', {}, String(e.node)), el('td', {}, e.user || ''),
            el('td', {}, e.operation || e.kind || ''), el('td', {}, e.path || ''), el('td', {}, String(e.status ?? '')),
            el('td', {}, e.error || ''));
        }),
      );
      say((reply.events || []).length + ' events');
    } catch (e) {
      say('Audit query failed: ' + e.message, true);
    }
  };
  const verify = async () => {
    verdict.textContent = 'Verifying…';
    try {
      const reply = dataOf(await api('GET', 'sys/audit/verify', undefined, { timeout: 60000 }));
      verdict.textContent = JSON.stringify(reply);
    } catch (e) {
      verdict.textContent = 'Verification failed: ' + e.message;
    }
  };
  root.append(
    el('h2', {}, 'Audit'),
    el('form', { class: 'inline', submit: (e) => { e.preventDefault(); query(); } },
      input('audit-node', 'Node', { inputmode: 'numeric', size: 4 }),
      input('audit-user', 'User'),
      input('audit-path', 'Path'),
      input('audit-since', 'Since', { value: '1h', size: 6 }),
      input('audit-limit', 'Limit', { value: '100', size: 5 }),
      el('button', { type: 'submit' }, 'Search')),
    el('table', {},
      el('thead', {}, el('tr', {}, ['Time', 'Node', 'User', 'Operation', 'Path', 'Status', 'Error'].map((h) => el('th', { scope: 'col' }, h)))),
      results),
    el('button', { type: 'button', click: verify }, 'Verify the hash chains'),
    verdict,
  );
  query();
  return () => {};
}

// ---- Alerts ----

function alertsPage(root) {
  const active = el('tbody', { id: 'alerts-active' });
  const resolved = el('tbody', { id: 'alerts-resolved' });
  const sinks = el('tbody', { id: 'alert-sinks' });
  const head = (...names) => el('thead', {}, el('tr', {}, names.map((h) => el('th', { scope: 'col' }, h))));
  const row = (a) => {
    const deliveries = Object.entries(a.deliveries || {}).map(([sink, state]) => sink + ': ' + state).join(', ');
    return el('tr', { class: a.status },
      el('td', {}, a.labels.alertname), el('td', {}, a.labels.severity || ''), el('td', {}, a.labels.node || ''),
      el('td', {}, (a.annotations && a.annotations.summary) || ''), el('td', {}, a.startsAt),
      el('td', {}, a.endsAt || ''), el('td', {}, deliveries || 'no sink'));
  };
  const type = el('select', { id: 'sink-type' }, el('option', { value: 'webhook' }, 'webhook'),
    el('option', { value: 'alertmanager' }, 'alertmanager'));
  const addSink = async () => {
    const name = $('sink-name').value.trim();
    try {
      await api('POST', 'sys/alerts/sinks/' + encodeURIComponent(name), { type: type.value, url: $('sink-url').value.trim() });
      say('Sink ' + name + ' saved');
      refresh();
    } catch (e) {
      say('Sink refused: ' + e.message, true);
    }
  };
  const refresh = async () => {
    try {
      const data = dataOf(await api('GET', 'sys/alerts'));
      active.replaceChildren(...data.active.map(row));
      resolved.replaceChildren(...data.resolved.map(row));
      if (!data.active.length) active.append(el('tr', {}, el('td', { colspan: 7 }, 'Nothing fires.')));
      const names = (await api('GET', 'sys/alerts/sinks?list=true').catch(() => ({ data: { keys: [] } }))).data.keys || [];
      const rows = [];
      for (const name of names) {
        const sink = dataOf(await api('GET', 'sys/alerts/sinks/' + encodeURIComponent(name)));
        const remove = el('button', {
          type: 'button',
          click: async () => {
            if (!window.confirm('Delete the alert sink ' + name + '?')) return;
            await api('DELETE', 'sys/alerts/sinks/' + encodeURIComponent(name)).catch((e) => say(e.message, true));
            refresh();
          },
        }, 'Delete');
        const error = (data.sink_errors || {})[name] || '';
        rows.push(el('tr', {}, el('td', {}, name), el('td', {}, sink.type), el('td', {}, sink.url || sink.address || ''),
          el('td', { class: error ? 'error' : '' }, error), el('td', {}, remove)));
      }
      sinks.replaceChildren(...rows);
    } catch (e) {
      say('Cannot read the alerts: ' + e.message, true);
    }
  };
  root.append(
    el('h2', {}, 'Alerts'),
    el('h3', {}, 'Firing'),
    el('table', {}, head('Alert', 'Severity', 'Node', 'Summary', 'Since', 'Until', 'Deliveries'), active),
    el('h3', {}, 'Sinks'),
    el('table', {}, head('Name', 'Type', 'Where', 'Last error (this node)', ''), sinks),
    el('form', { class: 'inline', submit: (e) => { e.preventDefault(); addSink(); } },
      el('label', { for: 'sink-name' }, 'Name'), el('input', { id: 'sink-name', required: true, size: 10 }),
      el('label', { for: 'sink-type' }, 'Type'), type,
      el('label', { for: 'sink-url' }, 'URL'), el('input', { id: 'sink-url', required: true, size: 40 }),
      el('button', { type: 'submit' }, 'Add or replace')),
    el('h3', {}, 'Resolved (last 24 hours)'),
    el('table', {}, head('Alert', 'Severity', 'Node', 'Summary', 'Since', 'Until', 'Deliveries'), resolved),
  );
  // One refresh at a time: a slow node must not pile requests up.
  let alive = true;
  (async () => {
    while (alive) {
      if (!document.hidden) await refresh();
      await sleep(ALERTS_POLL_MS);
    }
  })();
  return () => {
    alive = false;
  };
}

// ---- Snapshots ----

function snapshotsPage(root) {
  const result = el('p', { id: 'snapshot-result', role: 'status' });
  const schedules = el('tbody');
  const file = el('input', { id: 'restore-file', type: 'file' });
  const force = el('input', { id: 'restore-force', type: 'checkbox' });
  const take = async () => {
    result.textContent = 'Taking a snapshot…';
    try {
      const reply = await api('GET', 'sys/storage/raft/snapshot', undefined, { timeout: 120000, raw: true });
      const blob = await reply.blob();
      const name = 'citadel-' + new Date().toISOString().replace(/[:.]/g, '-') + '.snap';
      const link = el('a', { href: URL.createObjectURL(blob), download: name }, 'Download ' + name);
      result.replaceChildren('Snapshot taken: ' + blob.size + ' bytes. ', link);
    } catch (e) {
      result.textContent = 'Snapshot failed: ' + e.message;
    }
  };
  const restore = async () => {
    const chosen = file.files[0];
    if (!chosen) return say('Choose a snapshot file first.', true);
    const warning = force.checked
      ? 'Restore ' + chosen.name + ' even if it comes from another cluster? Every node’s data is replaced.'
      : 'Restore ' + chosen.name + '? Every node’s data is replaced (the audit log is kept).';
    if (!window.confirm(warning)) return;
    try {
      const path = force.checked ? 'sys/storage/raft/snapshot-force' : 'sys/storage/raft/snapshot';
      await api('POST', path, chosen, { timeout: 300000 });
      say('Restored ' + chosen.name);
    } catch (e) {
      say('Restore refused: ' + e.message, true);
    }
  };
  root.append(
    el('h2', {}, 'Snapshots'),
    el('button', { type: 'button', id: 'take-snapshot', click: take }, 'Take a snapshot'),
    result,
    el('h3', {}, 'Restore'),
    el('form', { class: 'inline', submit: (e) => { e.preventDefault(); restore(); } },
      el('label', { for: 'restore-file' }, 'Snapshot file'), file,
      el('label', { for: 'restore-force' }, force, ' even from another cluster'),
      el('button', { type: 'submit' }, 'Restore')),
    el('h3', {}, 'Scheduled snapshots'),
    el('table', {},
      el('thead', {}, el('tr', {}, ['Name', 'Every (s)', 'Keep', 'Directory', 'Last run', 'Last error'].map((h) => el('th', { scope: 'col' }, h)))),
      schedules),
  );
  (async () => {
    try {
      const names = (await api('GET', 'sys/storage/raft/snapshot-auto/config?list=true')).data.keys || [];
      for (const name of names) {
        const [config, status] = await Promise.all([
          api('GET', 'sys/storage/raft/snapshot-auto/config/' + encodeURIComponent(name)),
          api('GET', 'sys/storage/raft/snapshot-auto/status/' + encodeURIComponent(name)),
        ]);
        const c = config.data;
        const s = status.data;
        schedules.append(el('tr', {},
          el('td', {}, name), el('td', {}, String(c.interval)), el('td', {}, String(c.retain)),
          el('td', {}, c.path_prefix), el('td', {}, s.last_snapshot_end || s.last_snapshot_start || 'never'),
          el('td', { class: s.last_snapshot_error ? 'error' : '' }, s.last_snapshot_error || '')));
      }
      if (!names.length) schedules.append(el('tr', {}, el('td', { colspan: 6 }, 'None configured.')));
    } catch (e) {
      schedules.append(el('tr', {}, el('td', { colspan: 6 }, e.status === 404 ? 'None configured.' : 'Cannot list: ' + e.message)));
    }
  })();
  return () => {};
}

// ---- Navigation ----

const PAGES = {
  cluster: (root) => haPage(root, false),
  nodes: (root) => haPage(root, true),
  secrets: secretsPage,
  audit: auditPage,
  alerts: alertsPage,
  snapshots: snapshotsPage,
};

function show() {
  leavePage();
  leavePage = () => {};
  say('');
  const loggedIn = Boolean(token);
  $('login').hidden = loggedIn;
  $('nav').hidden = !loggedIn;
  $('logout').hidden = !loggedIn;
  const page = $('page');
  page.hidden = !loggedIn;
  page.replaceChildren();
  if (!loggedIn) {
    refreshBanner();
    $('token').focus();
    return;
  }
  const name = (location.hash.replace(/^#\//, '') || 'cluster').split('/')[0];
  const render = PAGES[name] || PAGES.cluster;
  for (const link of $('nav').querySelectorAll('a')) {
    if (link.getAttribute('href') === '#/' + name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  leavePage = render(page);
}

window.addEventListener('hashchange', show);
window.addEventListener('DOMContentLoaded', () => {
  wireLogin();
  show();
});
