// A consumer of QFLARE events in Node.js, written from docs/asyncapi.yaml alone:
// bind a queue to <namespace>.events (topic) with the channels' bindings, read the CloudEvents
// attributes from the `cloudEvents:` headers and the JSON body, print one JSON line per event.
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ NAMESPACE=qflare \
//   BINDINGS=round.completed,update.rejected.* UNTIL=round.completed node consumer.js
'use strict';
const amqp = require('amqplib');

const url = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/';
const exchange = `${process.env.NAMESPACE || 'qflare'}.events`;
const bindings = (process.env.BINDINGS || '#').split(',');
const until = process.env.UNTIL || '';
const timeoutMs = Number(process.env.TIMEOUT_MS || 120000);

async function main() {
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  await ch.checkExchange(exchange); // passive: a consumer creates nothing
  const { queue } = await ch.assertQueue('', { exclusive: true, autoDelete: true });
  for (const key of bindings) await ch.bindQueue(queue, exchange, key);
  console.log(JSON.stringify({ ready: true, exchange, bindings }));
  const timer = setTimeout(() => { console.error('timed out'); process.exit(2); }, timeoutMs);
  await ch.consume(queue, async (msg) => {
    const headers = msg.properties.headers || {};
    const ce = {};
    for (const [k, v] of Object.entries(headers)) {
      const m = /^cloudEvents[:_](.+)$/.exec(k);
      if (m) ce[m[1]] = String(v);
    }
    ce.datacontenttype = msg.properties.contentType;
    const event = msg.properties.contentType === 'application/json' ? JSON.parse(msg.content.toString('utf8')) : null;
    console.log(JSON.stringify({ routingKey: msg.fields.routingKey, persistent: msg.properties.deliveryMode === 2,
      cloudevent: ce, event }));
    if (until && msg.fields.routingKey === until) {
      clearTimeout(timer);
      await conn.close();
      process.exit(0);
    }
  }, { noAck: true });
}

main().catch((err) => { console.error(`error: ${err.message}`); process.exit(1); });
