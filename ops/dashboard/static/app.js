// The dashboard page: one snapshot at load, then every change over server-sent events.
'use strict';

function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : '-'; }
function short(fp) { return fp ? fp.slice(0, 16) : '-'; }
function reasons(obj) {
  const parts = Object.entries(obj || {}).map(([k, v]) => `${k}: ${v}`);
  return parts.length ? parts.join(', ') : '-';
}

function fill(tableId, rows, cells) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement('tr');
    for (const [value, cls] of cells(row)) {
      const td = document.createElement('td');
      td.textContent = value;
      if (cls) td.className = cls;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function render(s) {
  document.getElementById('namespace').textContent = s.namespace;
  document.getElementById('broker-error').textContent = s.broker_error || '';
  fill('rounds', [...s.rounds].reverse(), (r) => [
    [String(r.round_id)], [r.reason ? `${r.status} (${r.reason})` : r.status, `status ${r.status}`], [String(r.accepted)], [reasons(r.rejected)],
    [r.accuracy === null ? '-' : r.accuracy.toFixed(3)], [r.version === null ? '-' : `v${r.version}`]]);
  for (const [i, tr] of [...document.querySelectorAll('#rounds tbody tr')].entries()) {
    tr.id = `round-${[...s.rounds].reverse()[i].round_id}`;
  }
  lineChart(document.getElementById('accuracy-chart'), s.accuracy.map((a) => ({ x: a.round_id, y: a.accuracy })));
  fill('devices', s.devices, (d) => [
    [d.device_id], [d.state, `state ${d.state}`], [when(d.last_seen)], [String(d.accepted)], [String(d.rejected)],
    [d.reputation === null ? '-' : d.reputation.toFixed(2)], [short(d.sig_fp)]]);
  fill('queues', s.queues, (q) => [
    [q.queue], [String(q.messages)], [String(q.unacked)], [String(q.consumers)], [String(q.publish_rate)],
    [String(q.deliver_rate)]]);
  document.getElementById('queues-error').textContent = s.queues_error || '';
  const enclave = document.getElementById('enclave');
  const e = s.enclave || {};
  const items = e.measurement ? [['platform', e.platform || '-'], ['measurement', e.measurement],
    ['KEM key', e.kem_fp], ['signature key', e.sig_fp || '-'], ['platform key', e.platform_fp || '-'],
    ['attested', when(e.attested_at)]] : [['status', 'no enclave attested yet']];
  enclave.replaceChildren(...items.flatMap(([k, v]) => {
    const dt = document.createElement('dt'); dt.textContent = k;
    const dd = document.createElement('dd'); dd.textContent = v; dd.id = `enclave-${k.replace(' ', '-')}`;
    return [dt, dd];
  }));
  fill('rejections', Object.entries(s.rejections), ([k, v]) => [[k], [String(v)]]);
  fill('dead-letters', Object.entries(s.dead_letters), ([k, v]) => [[k], [String(v)]]);
  document.body.dataset.version = String(s.version);
}

function connect() {
  const live = document.getElementById('live');
  const source = new EventSource('/api/stream');
  source.addEventListener('state', (ev) => {
    live.textContent = 'live';
    live.className = 'badge live';
    render(JSON.parse(ev.data));
  });
  source.onerror = () => {
    live.textContent = 'reconnecting';
    live.className = 'badge';
  };
}

fetch('/api/state', { credentials: 'same-origin' })
  .then((r) => (r.status === 401 ? (location.href = '/login') : r.json()))
  .then((s) => { if (s) render(s); connect(); });
