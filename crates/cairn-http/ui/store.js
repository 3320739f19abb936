// The store-wide pages: lifecycle policies (edited with the prune preview), backups (list,
// verify, restore, mount), the lifecycle's events as they land, and the new-VM dialog.
'use strict';

(function () {
  const { el, clear, bytes, time, api, say } = Cairn;

  const DURATION = { s: 1, m: 60, h: 3600, d: 86400, w: 604800 };
  function parseDuration(s) {
    const m = /^\s*(\d+)\s*([smhdw]?)\s*$/.exec(s || '');
    return m ? parseInt(m[1], 10) * DURATION[m[2] || 's'] : null;
  }
  function showDuration(secs) {
    if (!secs) return '';
    for (const [u, n] of [['w', 604800], ['d', 86400], ['h', 3600], ['m', 60]]) if (secs % n === 0) return secs / n + u;
    return secs + 's';
  }

  function table(headers, rows) {
    return el('table', {},
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, rows));
  }

  // ---- policies ----
  const KEEPS = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'];

  Cairn.pages.policies = async function (page) {
    page.append(el('h2', {}, 'Lifecycle policies'),
      el('p', { className: 'muted' }, 'Scheduled checkpoints and which of them to keep (keep-* as Proxmox Backup Server counts them). Pinned and named checkpoints stay unless a policy includes named ones.'));
    const list = el('div');
    page.append(el('div', { className: 'buttons' }, el('button', { type: 'button', onclick: () => edit(null) }, 'New policy…')), list);
    async function load() {
      const ps = await api('GET', '/policies');
      clear(list).append(ps.length ? table(['Target', 'Every', 'Keep', 'Max age', 'Budget', ''], ps.map((p) =>
        el('tr', {},
          el('td', {}, p.target),
          el('td', {}, p.schedule || showDuration(p.every_secs) || '–'),
          el('td', {}, KEEPS.filter((k) => p.keep[k]).map((k) => k + ' ' + p.keep[k]).join(', ') || 'everything'),
          el('td', {}, showDuration(p.max_age_secs) || '–'),
          el('td', {}, p.budget_bytes ? bytes(p.budget_bytes) : '–'),
          el('td', {}, el('button', { type: 'button', onclick: () => edit(p) }, 'Edit'), ' ',
            el('button', { type: 'button', onclick: () => remove(p.target) }, 'Remove'))))) : el('p', { className: 'muted' }, 'No policies yet.'));
    }
    async function remove(target) {
      if (!(await Cairn.dialog('Remove the policy of ' + target + '?', [el('p', {}, 'Its checkpoints stay; no new ones are taken on schedule.')], 'Remove'))) return;
      await Cairn.try('Removing the policy', () => api('DELETE', '/policies/' + encodeURIComponent(target)));
      await load();
    }
    async function edit(p) {
      const target = Cairn.field('VM, volume or "default"', { type: 'text', value: p ? p.target : '', required: true, readOnly: !!p });
      const every = Cairn.field('Every (e.g. 1h, 30m; empty: none)', { type: 'text', value: p ? showDuration(p.every_secs) : '' });
      const keeps = KEEPS.map((k) => Cairn.field('Keep ' + k, { type: 'number', min: 0, value: p && p.keep[k] ? p.keep[k] : '' }));
      const maxAge = Cairn.field('Max age (e.g. 30d)', { type: 'text', value: p ? showDuration(p.max_age_secs) : '' });
      const budget = Cairn.field('Budget (e.g. 50G)', { type: 'text', value: p && p.budget_bytes ? String(p.budget_bytes) : '' });
      const manual = Cairn.field('Also prune checkpoints taken by name', { type: 'checkbox', checked: !!(p && p.include_manual) });
      const preview = el('div', { className: 'preview', 'aria-live': 'polite' });
      const policy = () => {
        const keep = {};
        keeps.forEach((f, i) => (keep[KEEPS[i]] = parseInt(f.input.value || '0', 10)));
        const out = { target: target.input.value.trim(), keep };
        if (every.input.value.trim()) out.every_secs = parseDuration(every.input.value);
        if (maxAge.input.value.trim()) out.max_age_secs = parseDuration(maxAge.input.value);
        if (budget.input.value.trim()) out.budget_bytes = Cairn.parseSize(budget.input.value);
        if (p && p.schedule) out.schedule = p.schedule;
        if (manual.input.checked) out.include_manual = true;
        return out;
      };
      const show = el('button', { type: 'button', onclick: async () => {
        clear(preview).append('Working out what would go…');
        try {
          const r = await api('POST', '/ops', { op: 'lifecycle', lifecycle: 'prune_preview', ...policy() });
          const items = r.value.value.items;
          const gone = items.filter((i) => i.verdict === 'remove' || i.verdict === 'expired');
          clear(preview).append(el('p', {}, gone.length + ' of ' + items.length + ' checkpoints would go, freeing ' + bytes(r.value.value.frees_total) + ' (exact).'),
            table(['Checkpoint', 'Taken', 'Verdict'], items.slice(-200).map((i) => el('tr', {}, el('td', {}, i.target + '@' + i.checkpoint), el('td', {}, time(i.created_ms)), el('td', {}, typeof i.verdict === 'string' ? i.verdict : 'keep ' + Object.values(i.verdict)[0])))));
        } catch (e) {
          clear(preview).append(el('p', { className: 'error' }, e.message));
        }
      } }, 'Preview what would be pruned');
      await Cairn.dialog(p ? 'Edit the policy of ' + p.target : 'New policy', [target.node, every.node, ...keeps.map((k) => k.node), maxAge.node, budget.node, manual.node, show, preview], 'Save', async () => {
        const pol = policy();
        await api('PUT', '/policies/' + encodeURIComponent(pol.target), pol);
        say('Saved the policy of ' + pol.target);
      });
      await load();
    }
    await Cairn.try('Loading policies', load);
  };

  // ---- backups ----
  Cairn.pages.backups = async function (page) {
    page.append(el('h2', {}, 'Backups'));
    const r = await Cairn.try('Listing repositories', () => api('POST', '/ops', { op: 'backup', backup: 'repo_list' }));
    if (!r) return;
    const repos = r.value.value;
    if (!repos.length) {
      page.append(el('p', { className: 'muted' }, 'No repository is registered: `cairn backup init` and `cairn backup repo add NAME REPO --key-file FILE` make one.'));
      return;
    }
    const pick = Cairn.field('Repository', { tag: 'select' });
    for (const e of repos) pick.input.append(el('option', { value: e.name, selected: e.default }, e.name + (e.default ? ' (default)' : '')));
    const pass = Cairn.field('Passphrase (not needed when the repository has a key file)', { type: 'password', autocomplete: 'off' });
    const list = el('div');
    page.append(pick.node, pass.node, el('div', { className: 'buttons' }, el('button', { type: 'button', onclick: load }, 'List backups'),
      el('button', { type: 'button', onclick: () => verify(null) }, 'Verify all')), list);
    const spec = () => ({ repo: pick.input.value, passphrase: pass.input.value || null });
    async function load() {
      clear(list).append('Loading…');
      const r = await Cairn.try('Listing backups', () => api('POST', '/ops', { op: 'backup', backup: 'list', repo: spec() }));
      clear(list);
      if (!r) return;
      const bs = r.value.value.backups;
      list.append(bs.length ? table(['Backup', 'Of', 'Taken', 'Size', ''], bs.map((b) => el('tr', {},
        el('td', {}, b.id), el('td', {}, b.kind + ' ' + b.name + '@' + b.checkpoint), el('td', {}, time(b.time_ms)),
        el('td', {}, bytes(b.images.reduce((a, i) => a + i.size, 0))),
        el('td', {}, el('button', { type: 'button', onclick: () => verify(b.id) }, 'Verify'), ' ',
          el('button', { type: 'button', onclick: () => restore(b) }, 'Restore'), ' ',
          el('button', { type: 'button', onclick: () => mount(b) }, 'Mount'))))) : el('p', { className: 'muted' }, 'No backups in this repository.'));
    }
    async function verify(id) {
      await Cairn.try('Verify', async () => {
        const r = await Cairn.job({ op: 'backup', backup: 'verify', repo: spec(), id, sample_percent: 100 }, 'Verifying');
        const v = r.value.value;
        say(v.problems.length
          ? 'Damage found: ' + v.problems.map((p) => p.object + ' (' + p.why + '; affects ' + p.affects.join(', ') + ')').join('; ')
          : 'Verified ' + v.backups + ' backup(s): ' + v.chunks_checked + ' chunks read back and check out', v.problems.length > 0);
      });
    }
    async function restore(b) {
      const n = Cairn.field(b.kind === 'vm' ? 'New VM name' : 'New volume name', { type: 'text', required: true });
      await Cairn.dialog('Restore ' + b.id, [n.node], 'Restore', async () => {
        await Cairn.job({ op: 'backup', backup: 'restore', repo: spec(), id: b.id, to: { kind: 'volume', name: n.input.value.trim() } }, 'Restoring');
        say('Restored ' + b.id + ' as ' + n.input.value.trim());
      });
      Cairn.loadTargets().catch(() => {});
    }
    async function mount(b) {
      await Cairn.try('Mount', async () => {
        const r = await api('POST', '/ops', { op: 'backup', backup: 'mount', repo: spec(), id: b.id });
        const m = r.value.value;
        say('Mounted: ' + m.map((x) => x.export || x.uri || JSON.stringify(x)).join(', '));
      });
    }
  };

  // ---- events ----
  Cairn.pages.events = function (page) {
    const list = el('ol', { className: 'events', reversed: true, 'aria-live': 'polite' });
    page.append(el('h2', {}, 'Events'), el('p', { className: 'muted' }, 'What the lifecycle did, live.'), list);
    const ctl = new AbortController();
    Cairn.leave = () => ctl.abort();
    const add = (e) => list.prepend(el('li', { 'data-kind': e.kind }, el('span', { className: 'muted' }, time(e.time_ms) + ' '), el('strong', {}, e.kind + ' '), e.target + (e.checkpoint ? '@' + e.checkpoint : '') + ': ' + e.message));
    Cairn.stream('/events/stream?limit=200', (_, e) => add(e), ctl.signal).catch((e) => {
      if (e.name !== 'AbortError') say('The event stream ended: ' + e.message, true);
    });
  };

  // ---- a new volume ----
  Cairn.pages.newVolume = async function () {
    const name = Cairn.field('Name', { type: 'text', required: true });
    const size = Cairn.field('Size (e.g. 64M, 10G)', { type: 'text', required: true });
    await Cairn.dialog('New volume', [name.node, size.node], 'Create', async () => {
      const bytesWanted = Cairn.parseSize(size.input.value);
      if (!bytesWanted) throw new Error('size: give a size such as 64M or 10G');
      await api('POST', '/volumes', { name: name.input.value.trim(), size: bytesWanted });
      say('Created volume ' + name.input.value.trim());
    });
    await Cairn.loadTargets();
  };

  // ---- a new VM ----
  Cairn.pages.newVm = async function () {
    const name = Cairn.field('Name', { type: 'text', required: true });
    const memory = Cairn.field('Memory', { type: 'text', value: '256M' });
    const cpus = Cairn.field('vCPUs', { type: 'number', min: 1, value: 1 });
    const disks = Cairn.field('Disks (existing volumes, comma-separated)', { type: 'text' });
    const kernel = Cairn.field('Kernel (path on the host)', { type: 'text' });
    const initrd = Cairn.field('Initramfs (path on the host)', { type: 'text' });
    const append = Cairn.field('Kernel command line', { type: 'text', value: 'console=ttyS0' });
    await Cairn.dialog('New VM', [name.node, memory.node, cpus.node, disks.node, kernel.node, initrd.node, append.node], 'Create', async () => {
      const mem = Cairn.parseSize(memory.input.value);
      if (!mem) throw new Error('memory: give a size such as 256M or 1G');
      const def = {
        name: name.input.value.trim(),
        memory: mem,
        cpus: parseInt(cpus.input.value, 10) || 1,
        disks: disks.input.value.split(',').map((s) => s.trim()).filter(Boolean),
        kernel: kernel.input.value.trim() || null,
        initrd: initrd.input.value.trim() || null,
        append: append.input.value || null,
      };
      await api('POST', '/vms', def);
      say('Created VM ' + def.name);
    });
    await Cairn.loadTargets();
  };
})();
