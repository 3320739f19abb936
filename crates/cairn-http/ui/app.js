// Cairn's web UI: the page shell, the API client, the list of VMs and volumes, and dialogs.
// Every user string reaches the page as text (textContent, never HTML), so names and
// descriptions that contain markup show as typed. target.js draws a VM's or volume's page;
// store.js the store-wide pages (policies, backups, events, a new VM).
'use strict';

const Cairn = (window.Cairn = {});

// ---- DOM helpers -------------------------------------------------------------------------

// Makes an element; `props` sets properties (className, type, onclick...) and `attrs` go
// through setAttribute when the key starts with "aria-" or "data-"; children are nodes or
// strings (added as text).
function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('aria-') || k.startsWith('data-') || k === 'for' || k === 'role') {
      e.setAttribute(k, v === true ? '' : String(v));
    } else {
      e[k] = v;
    }
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
Cairn.el = el;

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}
Cairn.clear = clear;

Cairn.bytes = function (n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return (i === 0 ? String(v) : v.toFixed(1)) + ' ' + units[i];
};

Cairn.time = function (ms) {
  if (!ms) return '–';
  const d = new Date(ms);
  return d.toISOString().replace('T', ' ').slice(0, 19) + ' UTC';
};

// Parses sizes as the CLI does: 256M, 1G, 4096.
Cairn.parseSize = function (s) {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)i?[bB]?\s*$/.exec(s || '');
  if (!m) return null;
  const mult = { '': 1, k: 1 << 10, m: 1 << 20, g: 1 << 30, t: 2 ** 40 }[m[2].toLowerCase()];
  return Math.round(parseFloat(m[1]) * mult);
};

// ---- status line -------------------------------------------------------------------------

let toastTimer = null;
Cairn.say = function (text, isError) {
  const s = document.getElementById('status');
  s.textContent = text;
  s.className = 'toast' + (isError ? ' error' : '');
  s.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (s.hidden = true), isError ? 8000 : 4000);
};

// ---- API client --------------------------------------------------------------------------

class ApiError extends Error {
  constructor(kind, message, status) {
    super(message);
    this.kind = kind;
    this.status = status;
  }
}

const TOKEN_KEY = 'cairn-token';

Cairn.api = async function (method, path, body) {
  const headers = { Authorization: 'Bearer ' + sessionStorage.getItem(TOKEN_KEY) };
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch('/api/v1' + path, init);
  if (r.status === 204) return null;
  let data = null;
  try {
    data = await r.json();
  } catch (_) {
    throw new ApiError('daemon', 'the daemon answered ' + r.status + ' without JSON', r.status);
  }
  if (!r.ok) {
    if (r.status === 401) signOut('Your token was refused: ' + data.message);
    throw new ApiError(data.kind, data.message, r.status);
  }
  return data;
};

// Runs an operation and reports failures on the status line; returns null on failure.
Cairn.try = async function (what, fn) {
  try {
    return await fn();
  } catch (e) {
    Cairn.say(what + ' failed: ' + e.message, true);
    return null;
  }
};

// Streams server-sent events from `path` (fetch, so the token goes in a header, not the URL);
// calls onEvent(name, data) per event until the stream ends or `signal` aborts.
Cairn.stream = async function (path, onEvent, signal) {
  const r = await fetch('/api/v1' + path, {
    headers: { Authorization: 'Bearer ' + sessionStorage.getItem(TOKEN_KEY) },
    signal,
  });
  if (!r.ok || !r.body) throw new ApiError('daemon', 'stream ' + path + ' failed: ' + r.status);
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let name = 'message';
      let data = '';
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
};

// Runs an operation as a job and waits for its end, reporting progress on the status line.
Cairn.job = async function (op, label) {
  const job = await Cairn.api('POST', '/jobs', op);
  let last = job;
  await Cairn.stream('/jobs/' + job.id + '/events', (name, info) => {
    last = info;
    if (name === 'running') Cairn.say(label + '… ' + Cairn.bytes(info.progress));
  });
  if (last.status.state === 'failed') {
    throw new ApiError(last.status.error.kind, last.status.error.message);
  }
  if (last.status.state === 'cancelled') throw new ApiError('cancelled', label + ' was cancelled');
  return last.status.reply;
};

// ---- dialogs -----------------------------------------------------------------------------

// Shows a modal dialog with `fields` (nodes); resolves to true when confirmed. `onOk` may
// throw to keep the dialog open with its message.
Cairn.dialog = function (title, fields, okLabel, onOk) {
  const d = document.getElementById('dialog');
  document.getElementById('dialog-title').textContent = title;
  clear(document.getElementById('dialog-body')).append(...fields);
  const err = document.getElementById('dialog-error');
  err.textContent = '';
  const ok = document.getElementById('dialog-ok');
  ok.textContent = okLabel || 'OK';
  return new Promise((resolve) => {
    const form = document.getElementById('dialog-form');
    const cancel = document.getElementById('dialog-cancel');
    const done = (v) => {
      form.onsubmit = null;
      cancel.onclick = null;
      d.onclose = null;
      if (d.open) d.close();
      resolve(v);
    };
    form.onsubmit = async (ev) => {
      ev.preventDefault();
      ok.disabled = true;
      try {
        if (onOk) await onOk();
        done(true);
      } catch (e) {
        err.textContent = e.message;
      } finally {
        ok.disabled = false;
      }
    };
    cancel.onclick = () => done(false);
    d.onclose = () => done(false);
    d.showModal();
    const first = d.querySelector('#dialog-body input, #dialog-body select, #dialog-body textarea');
    (first || ok).focus();
  });
};

// A labelled input for dialogs.
Cairn.field = function (label, props) {
  const id = 'f-' + Math.random().toString(36).slice(2);
  const input = el(props.tag || 'input', Object.assign({ id }, props, { tag: undefined }));
  return { input, node: el('p', { className: 'field' }, el('label', { for: id }, label), input) };
};

// ---- navigation --------------------------------------------------------------------------

Cairn.current = null; // { kind: 'vm'|'volume'|'page', name }
Cairn.pages = {}; // filled by target.js and store.js

Cairn.open = function (kind, name) {
  Cairn.current = { kind, name };
  // The address names the page, so it can be bookmarked and reloaded.
  const hash = '#' + kind + '/' + encodeURIComponent(name);
  if (location.hash !== hash) history.replaceState(null, '', hash);
  for (const b of document.querySelectorAll('nav .target')) {
    const on = b.dataset.kind === kind && b.dataset.name === name;
    const pageOn = kind === 'page' && b.dataset.page === name;
    b.setAttribute('aria-current', on || pageOn ? 'page' : 'false');
  }
  const page = clear(document.getElementById('page'));
  if (Cairn.leave) Cairn.leave();
  Cairn.leave = null;
  const draw = kind === 'page' ? Cairn.pages[name] : Cairn.pages.target;
  draw(page, kind, name);
};

// Fills the VM and volume lists; their checkpoint space comes after, from the space report.
Cairn.loadTargets = async function () {
  const [vms, volumes] = await Promise.all([Cairn.api('GET', '/vms'), Cairn.api('GET', '/volumes')]);
  const owner = {};
  for (const vm of vms) {
    for (const d of vm.disks) owner[d] = vm.name;
    owner[vm.name + '.state'] = vm.name;
  }
  const vmList = clear(document.getElementById('vm-list'));
  const statuses = await Promise.all(
    vms.map((vm) => Cairn.api('GET', '/vms/' + encodeURIComponent(vm.name) + '/status').catch(() => null)),
  );
  const spaceCells = {};
  vms.forEach((vm, i) => {
    const st = statuses[i] ? statuses[i].state : '?';
    const size = volumes.filter((v) => vm.disks.includes(v.name)).reduce((a, v) => a + v.size, 0);
    const state = volumes.find((v) => v.name === vm.name + '.state');
    const cps = state ? state.checkpoints : 0;
    const space = el('span', { className: 'space' }, '');
    spaceCells[vm.name] = { node: space, volumes: vm.disks.concat([vm.name + '.state']) };
    vmList.append(
      el('li', {},
        el('button', { type: 'button', className: 'target', 'data-kind': 'vm', 'data-name': vm.name,
          onclick: () => Cairn.open('vm', vm.name) },
          el('span', { className: 'name' }, vm.name),
          el('span', { className: 'badge state-' + st }, st),
          el('span', { className: 'meta' }, Cairn.bytes(size) + ' · ' + cps + ' checkpoint' + (cps === 1 ? '' : 's') + ' · '),
          space)));
  });
  if (!vms.length) vmList.append(el('li', { className: 'muted' }, 'No VMs yet.'));
  const volList = clear(document.getElementById('volume-list'));
  for (const v of volumes) {
    if (v.name.endsWith('.state') && owner[v.name]) continue;
    const space = el('span', { className: 'space' }, '');
    spaceCells['volume:' + v.name] = { node: space, volumes: [v.name] };
    volList.append(
      el('li', {},
        el('button', { type: 'button', className: 'target', 'data-kind': 'volume', 'data-name': v.name,
          onclick: () => Cairn.open('volume', v.name) },
          el('span', { className: 'name' }, v.name),
          owner[v.name] ? el('span', { className: 'badge' }, 'disk of ' + owner[v.name]) : null,
          el('span', { className: 'meta' }, Cairn.bytes(v.size) + ' · ' + v.checkpoints + ' checkpoint' + (v.checkpoints === 1 ? '' : 's') + ' · '),
          space)));
  }
  if (!volumes.length) volList.append(el('li', { className: 'muted' }, 'No volumes yet.'));
  if (Cairn.current) {
    for (const b of document.querySelectorAll('nav .target')) {
      const on = b.dataset.kind === Cairn.current.kind && b.dataset.name === Cairn.current.name;
      if (on) b.setAttribute('aria-current', 'page');
    }
  }
  // Checkpoint space per target, once the (heavier) space report is in.
  Cairn.api('POST', '/ops', { op: 'space', volume: null }).then((r) => {
    const held = {};
    for (const v of r.value.volumes) held[v.name] = v.checkpoints.reduce((a, c) => a + c.unique, 0);
    for (const cell of Object.values(spaceCells)) {
      const n = cell.volumes.reduce((a, v) => a + (held[v] || 0), 0);
      cell.node.textContent = Cairn.bytes(n) + ' in checkpoints';
    }
  }).catch(() => {});
};

Cairn.refresh = async function () {
  await Cairn.try('Loading', async () => {
    await Cairn.loadTargets();
    if (Cairn.current) Cairn.open(Cairn.current.kind, Cairn.current.name);
  });
};

// ---- sign in -----------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById('app').hidden = true;
  document.getElementById('refresh').hidden = true;
  document.getElementById('logout').hidden = true;
  document.getElementById('login').hidden = false;
  document.getElementById('login-error').textContent = message || '';
  document.getElementById('token').focus();
}

async function signIn() {
  const status = await Cairn.api('GET', '/status');
  document.getElementById('store').textContent = status.store + ' · Cairn ' + status.version;
  document.getElementById('login').hidden = true;
  document.getElementById('app').hidden = false;
  document.getElementById('refresh').hidden = false;
  document.getElementById('logout').hidden = false;
  await Cairn.loadTargets();
  openFromAddress();
}

// Opens the page the address names (#vm/NAME, #volume/NAME, #page/NAME), if any.
function openFromAddress() {
  const m = /^#(vm|volume|page)\/(.+)$/.exec(location.hash);
  if (m) Cairn.open(m[1], decodeURIComponent(m[2]));
}

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById('token').value.trim());
    try {
      await signIn();
    } catch (e) {
      signOut(e.message);
    }
  });
  document.getElementById('logout').onclick = () => signOut('');
  document.getElementById('refresh').onclick = () => Cairn.refresh();
  document.getElementById('new-vm').onclick = () => Cairn.pages.newVm();
  document.getElementById('new-volume').onclick = () => Cairn.pages.newVolume();
  for (const b of document.querySelectorAll('nav [data-page]')) {
    b.onclick = () => Cairn.open('page', b.dataset.page);
  }
  // A link or the back button changing the address opens that page.
  window.addEventListener('hashchange', () => {
    if (!document.getElementById('app').hidden) openFromAddress();
  });
  if (sessionStorage.getItem(TOKEN_KEY)) signIn().catch((e) => signOut(e.message));
  else signOut('');
});
