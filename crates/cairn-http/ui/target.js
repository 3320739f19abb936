// A VM's or a volume's page: its state and power buttons, the checkpoint tree (virtualised, so
// 10,000 checkpoints scroll as fast as 10), the actions on a checkpoint, the space chart with
// what deleting a selection frees and the change between two, and a VM's console.
'use strict';

(function () {
  const { el, clear, bytes, time, api, say } = Cairn;
  const ROW = 30; // px per tree row; the CSS uses the same height
  const enc = encodeURIComponent;

  // Tree rows from a checkpoint list: depth-first, children oldest first, with the "now" row
  // under the checkpoint the current state came from. Depth grows at branch points only.
  function rows(cps, headParent, collapsed) {
    const kids = new Map();
    const roots = [];
    for (const c of cps) {
      if (c.parent && cps.some((p) => p.name === c.parent)) {
        if (!kids.has(c.parent)) kids.set(c.parent, []);
        kids.get(c.parent).push(c);
      } else roots.push(c);
    }
    const now = { now: true, name: 'now' };
    if (headParent && kids.has(headParent)) kids.get(headParent).push(now);
    else if (headParent) kids.set(headParent, [now]);
    else roots.push(now);
    const out = [];
    // Iterative, so a chain of 10,000 does not overflow the stack.
    const stack = roots.slice().reverse().map((n) => [n, 0]);
    while (stack.length) {
      const [n, depth] = stack.pop();
      const ch = n.now ? [] : kids.get(n.name) || [];
      out.push({ node: n, depth, children: ch.length });
      // A chain stays in its column (the usual history: each checkpoint the next one's parent);
      // only a branch point moves its children right, so 10,000 in a row stay readable.
      const next = ch.length > 1 ? depth + 1 : depth;
      if (!collapsed.has(n.name)) for (let i = ch.length - 1; i >= 0; i--) stack.push([ch[i], next]);
    }
    return out;
  }

  function kindOf(c, isVm) {
    if (!isVm) return 'disk';
    if (c.kind === 'standard') return 'standard';
    return c.consistency === 'application' ? 'application-consistent' : c.consistency === 'vm-stopped' ? 'disk-only (stopped)' : 'crash-consistent';
  }

  Cairn.pages.target = async function (page, kind, name) {
    const isVm = kind === 'vm';
    const base = '/targets/' + enc(name);
    const state = { cps: [], headParent: null, collapsed: new Set(), selected: new Set(), current: null, rows: [] };
    const head = el('div', { className: 'page-head' }, el('h2', {}, (isVm ? 'VM ' : 'Volume ') + name));
    const info = el('p', { className: 'muted' });
    const power = el('div', { className: 'buttons' });
    const tabs = el('div', { role: 'tablist', className: 'tabs' });
    const body = el('div', { className: 'tab-body' });
    page.append(head, info, power, tabs, body);

    async function loadInfo() {
      if (isVm) {
        const [vm, st] = await Promise.all([api('GET', '/vms/' + enc(name)), api('GET', '/vms/' + enc(name) + '/status')]);
        info.textContent = st.state + ' · ' + bytes(vm.memory) + ' RAM · ' + vm.cpus + ' vCPU · disks: ' + vm.disks.join(', ') + (st.accel ? ' · ' + st.accel : '');
        clear(power).append(
          el('button', { type: 'button', disabled: st.state !== 'stopped', onclick: () => powerOp('start') }, 'Start'),
          el('button', { type: 'button', disabled: st.state === 'stopped', onclick: () => powerOp('stop') }, 'Stop'),
          el('button', { type: 'button', disabled: st.state === 'stopped', onclick: () => powerOp('kill') }, 'Kill'),
        );
      } else {
        const v = await api('GET', '/volumes/' + enc(name));
        info.textContent = bytes(v.size) + ' · ' + bytes(v.referenced) + ' mapped · ' + v.checkpoints + ' checkpoints';
      }
    }

    async function powerOp(op) {
      if (op !== 'start' && !(await Cairn.dialog((op === 'kill' ? 'Kill ' : 'Stop ') + name + '?', [el('p', {}, op === 'kill' ? 'QEMU stops at once, like pulling the plug.' : 'The guest is asked to power off (hard after 60 s).')], op === 'kill' ? 'Kill' : 'Stop'))) return;
      say((op === 'start' ? 'Starting ' : 'Stopping ') + name + '…');
      await Cairn.try(op, async () => {
        await api('POST', '/vms/' + enc(name) + '/' + op);
        say(name + ': ' + op + ' done');
      });
      await loadInfo();
      Cairn.loadTargets().catch(() => {});
    }

    // ---- tabs ----
    const tabNames = isVm ? ['Checkpoints', 'Space', 'Console'] : ['Checkpoints', 'Space'];
    let leave = null;
    function show(i) {
      tabs.querySelectorAll('[role=tab]').forEach((t, j) => {
        t.setAttribute('aria-selected', String(i === j));
        t.tabIndex = i === j ? 0 : -1;
      });
      if (leave) leave();
      leave = null;
      clear(body);
      ({ Checkpoints: drawTree, Space: drawSpace, Console: drawConsole })[tabNames[i]]();
    }
    tabNames.forEach((t, i) => {
      tabs.append(el('button', { type: 'button', role: 'tab', id: 'tab-' + t.toLowerCase(), onclick: () => show(i),
        onkeydown: (ev) => {
          if (ev.key === 'ArrowRight' || ev.key === 'ArrowLeft') {
            const j = (i + (ev.key === 'ArrowRight' ? 1 : tabNames.length - 1)) % tabNames.length;
            show(j);
            tabs.children[j].focus();
          }
        } }, t));
    });
    Cairn.leave = () => leave && leave();

    async function loadCheckpoints() {
      // The daemon hands a list out in pages of up to 1,000; the tree needs all of it.
      const cps = [];
      let r, after = null;
      do {
        r = await api('GET', base + '/checkpoints' + (after ? '?after=' + encodeURIComponent(after) : ''));
        for (const c of r.value.checkpoints) cps.push(c);
        after = r.value.next;
      } while (after);
      state.cps = cps;
      state.headParent = r.value.head_parent;
      for (const s of [...state.selected]) if (!state.cps.some((c) => c.name === s)) state.selected.delete(s);
      if (state.current && !state.cps.some((c) => c.name === state.current)) state.current = null;
    }

    // ---- the tree ----
    function drawTree() {
      const bar = el('div', { className: 'buttons' });
      const sel = el('p', { className: 'selection', 'aria-live': 'polite' });
      const viewport = el('div', { className: 'tree', tabIndex: 0, role: 'tree', 'aria-label': 'Checkpoints of ' + name });
      const spacer = el('div', { className: 'tree-spacer' });
      viewport.append(spacer);
      body.append(bar, sel, viewport);
      const btn = (label, fn, needsCurrent) => el('button', { type: 'button', onclick: fn, disabled: needsCurrent && !state.current, 'data-action': label.toLowerCase() }, label);

      function toolbar() {
        const cur = state.cps.find((c) => c.name === state.current);
        clear(bar).append(
          btn('Create', createCheckpoint),
          btn('Apply', () => applyCheckpoint(cur), true),
          btn('Delete', () => deleteCheckpoints(), true),
          btn('Rename', () => renameCheckpoint(cur), true),
          btn(cur && cur.pinned ? 'Unpin' : 'Pin', () => pinCheckpoint(cur), true),
          btn('Clone', () => cloneCheckpoint(cur), true),
        );
      }

      async function selectionInfo() {
        const names = [...state.selected];
        clear(sel);
        if (!names.length) {
          sel.textContent = state.cps.length + ' checkpoints. Tick checkpoints to see what deleting them frees; tick two to see the change between them.';
          return;
        }
        sel.textContent = names.length + ' selected…';
        const f = await api('GET', base + '/space/freed?checkpoints=' + enc(names.join(','))).catch((e) => ({ error: e.message }));
        let text = f.error ? f.error : 'Deleting ' + names.length + ' selected frees ' + bytes(f.bytes) + ' (exact).';
        if (names.length === 2) {
          const d = await api('GET', base + '/diff?from=' + enc(names[0]) + '&to=' + enc(names[1])).catch(() => null);
          if (d) text += ' Change between ' + names[0] + ' and ' + names[1] + ': ' + bytes(d.bytes) + ' in ' + d.ranges + ' ranges.';
        }
        sel.textContent = text;
      }

      function render() {
        state.rows = rows(state.cps, state.headParent, state.collapsed);
        spacer.style.height = state.rows.length * ROW + 'px';
        paint();
        toolbar();
      }

      // Only the rows in view (and a few around) are in the DOM.
      function paint() {
        for (const r of viewport.querySelectorAll('.row')) r.remove();
        const first = Math.max(0, Math.floor(viewport.scrollTop / ROW) - 10);
        const last = Math.min(state.rows.length, first + Math.ceil(viewport.clientHeight / ROW) + 20);
        for (let i = first; i < last; i++) viewport.append(rowNode(state.rows[i], i));
        // When the tree first showed rows after the page loaded (the UI benchmark reads it).
        if (state.rows.length && window.cairnTreePaintMs === undefined) window.cairnTreePaintMs = performance.now();
      }

      function rowNode(r, i) {
        const c = r.node;
        const row = el('div', { className: 'row' + (c.now ? ' now' : '') + (state.current === c.name && !c.now ? ' current' : ''), role: 'treeitem', 'aria-level': r.depth + 1, 'aria-selected': String(state.current === c.name), 'data-name': c.name, id: 'row-' + i });
        row.style.top = i * ROW + 'px';
        row.style.paddingLeft = 8 + r.depth * 18 + 'px';
        if (c.now) {
          row.append(el('span', { className: 'marker' }, '▶'), el('strong', {}, 'now'), el('span', { className: 'muted' }, ' current state'));
          return row;
        }
        const toggle = el('button', { type: 'button', className: 'toggle' + (r.children ? '' : ' leaf'), 'aria-label': (state.collapsed.has(c.name) ? 'Expand ' : 'Collapse ') + c.name, 'aria-hidden': !r.children, tabIndex: -1,
          onclick: (ev) => { ev.stopPropagation(); state.collapsed.has(c.name) ? state.collapsed.delete(c.name) : state.collapsed.add(c.name); render(); } }, state.collapsed.has(c.name) ? '▸' : '▾');
        const box = el('input', { type: 'checkbox', checked: state.selected.has(c.name), tabIndex: -1, 'aria-label': 'Select ' + c.name,
          onclick: (ev) => { ev.stopPropagation(); ev.target.checked ? state.selected.add(c.name) : state.selected.delete(c.name); selectionInfo(); } });
        row.append(...[toggle, box,
          el('span', { className: 'cp-name' }, c.name),
          el('span', { className: 'badge' }, kindOf(c, isVm)),
          c.pinned ? el('span', { className: 'badge pin' }, 'pinned') : null,
          c.automatic ? el('span', { className: 'badge' }, 'auto') : null,
          el('span', { className: 'muted' }, time(c.created_ms)),
          c.description ? el('span', { className: 'desc' }, c.description) : null].filter(Boolean));
        row.onclick = () => { state.current = c.name; viewport.setAttribute('aria-activedescendant', row.id); paint(); toolbar(); };
        return row;
      }

      viewport.addEventListener('scroll', () => requestAnimationFrame(paint));
      viewport.addEventListener('keydown', (ev) => {
        const i = state.rows.findIndex((r) => r.node.name === state.current && !r.node.now);
        let j = i;
        if (ev.key === 'ArrowDown') j = Math.min(state.rows.length - 1, i + 1);
        else if (ev.key === 'ArrowUp') j = Math.max(0, i - 1);
        else if (ev.key === ' ' && state.current) {
          state.selected.has(state.current) ? state.selected.delete(state.current) : state.selected.add(state.current);
          selectionInfo(); paint(); ev.preventDefault(); return;
        } else return;
        ev.preventDefault();
        if (state.rows[j] && !state.rows[j].node.now) state.current = state.rows[j].node.name;
        const top = j * ROW;
        if (top < viewport.scrollTop) viewport.scrollTop = top;
        else if (top + ROW > viewport.scrollTop + viewport.clientHeight) viewport.scrollTop = top + ROW - viewport.clientHeight;
        paint(); toolbar();
        viewport.setAttribute('aria-activedescendant', 'row-' + j);
      });

      async function reload() {
        await loadCheckpoints();
        render();
        selectionInfo();
        loadInfo().catch(() => {});
        Cairn.loadTargets().catch(() => {});
      }
      Cairn.reloadTree = reload;

      async function createCheckpoint() {
        const n = Cairn.field('Name (a timestamp when empty)', { type: 'text', name: 'name' });
        const d = Cairn.field('Description', { type: 'text', name: 'description' });
        const fields = [n.node, d.node];
        let diskOnly = null;
        if (isVm) {
          diskOnly = Cairn.field('Disks only (no memory; the VM restarts when applied)', { type: 'checkbox', name: 'disk_only' });
          fields.push(diskOnly.node);
        }
        await Cairn.dialog('New checkpoint of ' + name, fields, 'Create', async () => {
          const r = await api('POST', base + '/checkpoints', {
            name: n.input.value.trim() || null,
            description: d.input.value || null,
            disk_only: diskOnly ? diskOnly.input.checked : false,
          });
          const v = r.value;
          const made = v.name || (v.checkpoint && v.checkpoint.name) || '';
          say('Created checkpoint ' + made + (v.paused_us ? ' (paused ' + (v.paused_us / 1000).toFixed(1) + ' ms)' : ''));
        });
        await reload();
      }

      async function applyCheckpoint(c) {
        const lost = state.headParent
          ? await api('GET', base + '/diff?from=' + enc(state.headParent)).catch(() => null)
          : null;
        const keep = Cairn.field('Keep the current state as a checkpoint named', { type: 'text', name: 'keep', placeholder: 'leave empty to let Cairn keep it automatically' });
        const discard = Cairn.field('Discard the current state (it cannot be got back)', { type: 'checkbox', name: 'discard' });
        const warn = el('p', {}, 'Applying ' + c.name + ' replaces the current state of ' + name + '. ' +
          (lost ? 'Since ' + state.headParent + ', ' + bytes(lost.bytes) + ' of disk changed' + (isVm ? ' (and the running guest\u2019s memory)' : '') + '; that is what is lost unless kept.' : ''));
        await Cairn.dialog('Apply ' + c.name + '?', [warn, keep.node, discard.node], 'Apply', async () => {
          const r = await api('POST', base + '/checkpoints/' + enc(c.name) + '/apply', {
            keep_current: keep.input.value.trim() || null,
            discard_current: discard.input.checked,
          });
          const saved = r.value && r.value.saved_as;
          say('Applied ' + c.name + (saved ? '; the state before is kept as ' + saved : ''));
        });
        await reload();
      }

      async function deleteCheckpoints() {
        const names = state.selected.size ? [...state.selected] : [state.current];
        const f = await api('GET', base + '/space/freed?checkpoints=' + enc(names.join(','))).catch((e) => ({ error: e.message }));
        const text = f.error ? f.error : 'Deleting ' + names.join(', ') + ' frees ' + bytes(f.bytes) + ' (exact).';
        await Cairn.dialog('Delete ' + names.length + ' checkpoint' + (names.length === 1 ? '' : 's') + '?', [el('p', {}, text)], 'Delete', async () => {
          for (const n of names) await api('DELETE', base + '/checkpoints/' + enc(n));
          say('Deleted ' + names.join(', '));
        });
        await reload();
      }

      async function renameCheckpoint(c) {
        const n = Cairn.field('New name', { type: 'text', name: 'new_name', value: c.name });
        const d = Cairn.field('Description', { type: 'text', name: 'description', value: c.description || '' });
        await Cairn.dialog('Rename or describe ' + c.name, [n.node, d.node], 'Save', async () => {
          const body = {};
          if (d.input.value !== (c.description || '')) body.description = d.input.value;
          if (n.input.value.trim() !== c.name) body.new_name = n.input.value.trim();
          await api('PATCH', base + '/checkpoints/' + enc(c.name), body);
          if (body.new_name) state.current = body.new_name;
        });
        await reload();
      }

      async function pinCheckpoint(c) {
        await Cairn.dialog((c.pinned ? 'Unpin ' : 'Pin ') + c.name + '?', [el('p', {}, c.pinned ? 'Retention policies may then delete it.' : 'No retention policy or space reclaim will delete it.')], c.pinned ? 'Unpin' : 'Pin', async () => {
          await api('PATCH', base + '/checkpoints/' + enc(c.name), { pinned: !c.pinned });
        });
        await reload();
      }

      async function cloneCheckpoint(c) {
        const n = Cairn.field(isVm ? 'New VM name' : 'New volume name', { type: 'text', name: 'new_name', required: true });
        await Cairn.dialog('Clone ' + c.name + (isVm ? ' to a new VM' : ' to a new volume'), [n.node], 'Clone', async () => {
          await api('POST', base + '/checkpoints/' + enc(c.name) + '/clone', { new_name: n.input.value.trim() });
          say('Cloned ' + c.name + ' to ' + n.input.value.trim());
        });
        await Cairn.loadTargets();
      }

      reload().catch((e) => say('Loading checkpoints failed: ' + e.message, true));
    }

    // ---- the space chart ----
    async function drawSpace() {
      const note = el('p', { className: 'muted' }, 'Loading the exact space of every checkpoint…');
      const chart = el('div', { className: 'chart', role: 'list', 'aria-label': 'Space per checkpoint' });
      const freed = el('p', { className: 'selection', 'aria-live': 'polite' });
      body.append(note, freed, chart);
      const r = await api('GET', base + '/space').catch((e) => { note.textContent = e.message; return null; });
      if (!r) return;
      // A VM's report is per VM checkpoint; a volume's per checkpoint of its one volume.
      let items;
      let headUnique = 0;
      if (r.reply === 'vm_space') {
        items = r.value.checkpoints.map((c) => ({ name: c.name, referenced: c.referenced, unique: c.unique }));
      } else {
        const v = r.value.volumes[0];
        items = v.checkpoints.map((c) => ({ name: c.name, referenced: c.referenced, unique: c.unique }));
        headUnique = v.head_unique;
      }
      const total = items.reduce((a, c) => a + c.unique, 0);
      const shown = items.length > 500 ? items.slice().sort((a, b) => b.unique - a.unique).slice(0, 500) : items;
      note.textContent = items.length + ' checkpoints hold ' + bytes(total) + ' of their own' + (r.reply === 'vm_space' ? '' : '; the current state ' + bytes(headUnique)) + '.' + (shown.length < items.length ? ' The 500 largest are drawn.' : '') + ' Dark: unique (freed by deleting it alone); light: shared.';
      const max = Math.max(1, ...shown.map((c) => c.referenced));
      const picked = new Set();
      for (const c of shown) {
        const u = el('span', { className: 'bar-unique' });
        const s = el('span', { className: 'bar-shared' });
        u.style.width = (100 * c.unique) / max + '%';
        s.style.width = (100 * (c.referenced - c.unique)) / max + '%';
        const box = el('input', { type: 'checkbox', 'aria-label': 'Select ' + c.name, onchange: async (ev) => {
          ev.target.checked ? picked.add(c.name) : picked.delete(c.name);
          if (!picked.size) { freed.textContent = ''; return; }
          const f = await api('GET', base + '/space/freed?checkpoints=' + enc([...picked].join(','))).catch((e) => ({ error: e.message }));
          freed.textContent = f.error || 'Deleting the ' + picked.size + ' selected frees ' + bytes(f.bytes) + ' (exact).';
        } });
        chart.append(el('div', { className: 'bar-row', role: 'listitem', 'data-name': c.name },
          box, el('span', { className: 'cp-name' }, c.name),
          el('span', { className: 'bar' }, u, s),
          el('span', { className: 'bar-label' }, bytes(c.unique) + ' unique · ' + bytes(c.referenced - c.unique) + ' shared')));
      }
    }

    // ---- the console ----
    function drawConsole() {
      const pre = el('pre', { className: 'console', tabIndex: 0, 'aria-label': 'Serial console of ' + name, 'aria-live': 'off' });
      body.append(el('p', { className: 'muted' }, 'Read-only, live.'), pre);
      let next = null;
      const ctl = new AbortController();
      // The stream pushes each piece of output as the guest prints it; if it ends (the daemon
      // restarts), it is opened again from where it stopped.
      async function follow() {
        while (!ctl.signal.aborted) {
          const from = next === null ? '' : '?from=' + next;
          await Cairn.stream('/vms/' + enc(name) + '/console/stream' + from, (_, r) => {
            if (next !== null && r.offset < next) pre.textContent = ''; // a new run began a new log
            pre.textContent += r.text;
            if (pre.textContent.length > 200000) pre.textContent = pre.textContent.slice(-100000);
            next = r.next;
            pre.scrollTop = pre.scrollHeight;
          }, ctl.signal).catch(() => null);
          if (!ctl.signal.aborted) await new Promise((ok) => setTimeout(ok, 1000));
        }
      }
      follow();
      leave = () => ctl.abort();
    }

    await Cairn.try('Loading ' + name, loadInfo);
    show(0);
  };
})();
