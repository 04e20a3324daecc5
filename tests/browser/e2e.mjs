// Real-browser end-to-end test of the wschat page.
//
//   node tests/browser/e2e.mjs http://127.0.0.1:PORT SCREENSHOT_DIR
//
// Drives Debian's Chromium (/usr/bin/chromium, or $CHROMIUM) through
// playwright-core (a fresh temporary profile per launch) with one browser
// context per user. Each step prints
// `ok   <step>` or `FAIL <step>: <why>`; the exit code is non-zero if any
// step failed. Every wait is on a condition (locator waits), never a sleep.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

const base = process.argv[2];
const shotDir = path.resolve(process.argv[3] || 'target/browser');
if (!base) {
  console.error('usage: node e2e.mjs http://HOST:PORT [SCREENSHOT_DIR]');
  process.exit(2);
}
fs.mkdirSync(shotDir, { recursive: true });

const WAIT = 10_000;
const T = (id) => `[data-testid="${id}"]`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  timeout: 30_000,
});

const problems = []; // page errors and dialogs, checked by the steps
const pages = {};

async function newUser(name, viewport = { width: 1000, height: 700 }) {
  const context = await browser.newContext({ viewport, locale: 'en-US' });
  context.setDefaultTimeout(WAIT);
  const page = await context.newPage();
  page.on('dialog', async (d) => { problems.push(`${name}: dialog "${d.message()}"`); await d.dismiss(); });
  page.on('pageerror', (e) => problems.push(`${name}: page error ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') console.log(`  [${name} console] ${m.text()}`); });
  await page.goto(base + '/');
  pages[name] = page;
  return page;
}

async function join(page, name) {
  await page.locator(T('username-input')).fill(name);
  await page.locator(T('join-button')).click();
}

async function expectOnline(page) {
  await page.locator(`${T('conn-state')}[data-state="online"]`).waitFor();
}

const person = (page, name) => page.locator(`${T('person')}[data-user="${name}"]`);
const messages = (page) => page.locator(`${T('messages')} ${T('message')}`);
const messageWith = (page, text) =>
  messages(page).filter({ has: page.locator(T('message-body'), { hasText: text }) });

async function openConv(page, name) {
  await person(page, name).click();
  await page.locator(T('conv-title')).filter({ hasText: '@' + name }).waitFor();
}

async function openPublic(page) {
  await page.locator(T('public-channel')).click();
  await page.locator(T('conv-title')).filter({ hasText: '# public' }).waitFor();
}

async function sendText(page, text) {
  const box = page.locator(T('composer'));
  await box.click();
  await box.fill(text);
  await box.press('Enter');
  await page.waitForFunction((el) => el.value === '', await box.elementHandle());
}

async function bodies(page) {
  return page.locator(`${T('messages')} ${T('message-body')}`).allTextContents();
}

async function ids(page) {
  return messages(page).evaluateAll((els) => els.map((e) => e.dataset.id || e.dataset.key));
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

function noDuplicates(list, what) {
  const seen = new Set();
  for (const x of list) {
    assert(!seen.has(x), `${what}: message ${x} shown twice (${JSON.stringify(list)})`);
    seen.add(x);
  }
}

const results = [];
const failed = new Set();
async function step(name, deps, fn) {
  const blocked = deps.filter((d) => failed.has(d));
  if (blocked.length) {
    failed.add(name);
    results.push([name, false]);
    console.log(`FAIL ${name}: skipped, needs ${blocked.join(', ')}`);
    return;
  }
  const started = Date.now();
  try {
    await fn();
    results.push([name, true]);
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed.add(name);
    results.push([name, false]);
    console.log(`FAIL ${name}: ${String(e && e.message || e).split('\n').slice(0, 6).join('\n     ')}`);
  }
}

const PRIVATE = 'hi bob 👋 你好 مرحبا بك';
const XSS = '<img src=x onerror=alert(1)>';
let alice, bob, carol;

await step('join', [], async () => {
  alice = await newUser('alice');
  bob = await newUser('bob');
  carol = await newUser('carol');
  await join(alice, 'alice');
  await expectOnline(alice);
  await join(bob, 'bob');
  await expectOnline(bob);
  await join(carol, 'carol');
  await expectOnline(carol);
  await person(alice, 'bob').waitFor();
  await person(alice, 'carol').waitFor();
  await person(carol, 'alice').waitFor();
  assert((await alice.locator(T('me')).textContent()) === 'alice', 'header shows the name');
});

await step('invalid name is refused', [], async () => {
  const p = await newUser('stranger');
  await join(p, 'not valid!');
  await p.locator(T('login-error')).filter({ hasText: /invalid username/i }).waitFor();
  await p.context().close();
});

await step('taken name shows its error', ['join'], async () => {
  const p = await newUser('impostor');
  await join(p, 'alice');
  await p.locator(T('login-error')).filter({ hasText: /taken/i }).waitFor();
  await p.locator(T('login')).waitFor();
  // alice is still online and unaffected
  await expectOnline(alice);
  await p.context().close();
});

await step('private message alice -> bob (receipt, unread, Shift+Enter)', ['join'], async () => {
  await openConv(alice, 'bob');
  const box = alice.locator(T('composer'));
  await box.click();
  await box.pressSequentially(PRIVATE);
  await box.press('Shift+Enter');
  await box.pressSequentially('second line');
  await box.press('Enter');
  const mine = messageWith(alice, 'second line');
  await mine.locator(`${T('message-status')}[data-status="delivered"]`).waitFor();
  // bob sees an unread count on alice, then the message with its newline kept
  await person(bob, 'alice').locator(T('unread')).filter({ hasText: '1' }).waitFor();
  await openConv(bob, 'alice');
  const got = messageWith(bob, 'second line').locator(T('message-body'));
  await got.waitFor();
  assert((await got.textContent()) === PRIVATE + '\nsecond line', `body differs: ${await got.textContent()}`);
  assert((await got.getAttribute('dir')) === 'auto', 'body has dir=auto');
  assert(!(await person(bob, 'alice').locator(T('unread')).isVisible()), 'unread cleared on open');
  await sendText(bob, 'hey alice, lunch?');
  await messageWith(alice, 'lunch?').waitFor();
});

await step('carol never sees the private conversation', ['private message alice -> bob (receipt, unread, Shift+Enter)'], async () => {
  const html = await carol.content();
  assert(!html.includes('second line') && !html.includes('lunch?'), 'private text in carol\'s page');
  const stored = await carol.evaluate(() => JSON.stringify({ ...localStorage }));
  assert(!stored.includes('second line') && !stored.includes('lunch?'), 'private text in carol\'s storage');
  assert(!(await person(carol, 'alice').locator(T('unread')).isVisible()), 'carol has unread from alice');
});

await step('public message reaches all three', ['join'], async () => {
  await sendText(carol, 'hello everyone from carol');
  await messageWith(carol, 'hello everyone from carol').waitFor();
  for (const p of [alice, bob]) {
    await p.locator(T('public-channel')).locator(T('unread')).filter({ hasText: '1' }).waitFor();
    await openPublic(p);
    await messageWith(p, 'hello everyone from carol').waitFor();
  }
});

await step('XSS body renders as text, no dialog', ['join'], async () => {
  await openPublic(alice);
  await sendText(alice, XSS);
  await openConv(alice, 'bob');
  await sendText(alice, XSS);
  await messageWith(alice, 'onerror').locator(`${T('message-status')}[data-status="delivered"]`).waitFor();
  for (const p of [bob, carol]) {
    await openPublic(p);
    const body = messageWith(p, 'onerror').locator(T('message-body'));
    await body.waitFor();
    assert((await body.textContent()) === XSS, 'public body is the literal text');
  }
  await openConv(bob, 'alice');
  const priv = messageWith(bob, 'onerror').locator(T('message-body'));
  await priv.waitFor();
  assert((await priv.textContent()) === XSS, 'private body is the literal text');
  for (const [n, p] of Object.entries({ alice, bob, carol })) {
    assert((await p.locator(`${T('messages')} img`).count()) === 0, `${n}: an <img> was created`);
  }
  const dialogs = problems.filter((x) => x.includes('dialog'));
  assert(dialogs.length === 0, dialogs.join('; '));
});

const notice = (page, kind, text) =>
  page.locator(`${T('messages')} ${T('notice')}[data-kind="${kind}"]`).filter({ hasText: text });

await step('join and leave lines in #public', ['join'], async () => {
  await openPublic(alice);
  const erin = await newUser('erin');
  await join(erin, 'erin');
  await expectOnline(erin);
  await notice(alice, 'join', 'erin joined').waitFor();
  await erin.context().close();
  await notice(alice, 'leave', 'erin left').waitFor();
  assert(!(await alice.locator(T('public-channel')).locator(T('unread')).isVisible()), 'presence lines count as unread');
});

await step('links: http(s) addresses become <a>, javascript: stays text', ['join'], async () => {
  const text = 'docs at https://example.com/a?b=1&c=2. not javascript:alert(1), JAVASCRIPT:alert(2) ' +
    'or <a href="javascript:alert(3)">x</a> (see http://example.org/x_(y))';
  await openPublic(alice);
  await openPublic(bob);
  await sendText(alice, text);
  const body = messageWith(bob, 'docs at').locator(T('message-body'));
  await body.waitFor();
  assert((await body.textContent()) === text, `the text changed: ${await body.textContent()}`);
  const links = await body.locator('a').evaluateAll((as) =>
    as.map((a) => ({ href: a.getAttribute('href'), text: a.textContent, rel: a.rel, target: a.target })));
  const want = ['https://example.com/a?b=1&c=2', 'http://example.org/x_(y)'];
  assert(JSON.stringify(links.map((l) => l.href)) === JSON.stringify(want), `links: ${JSON.stringify(links)}`);
  assert(JSON.stringify(links.map((l) => l.text)) === JSON.stringify(want), `link texts: ${JSON.stringify(links)}`);
  for (const l of links) {
    assert(l.rel.split(' ').includes('noopener') && l.rel.split(' ').includes('noreferrer'), `rel="${l.rel}"`);
    assert(l.target === '_blank', `target="${l.target}"`);
  }
  for (const [n, p] of Object.entries({ alice, bob })) {
    const hrefs = await p.locator(`${T('messages')} a`).evaluateAll((as) => as.map((a) => a.protocol));
    assert(hrefs.every((h) => h === 'https:' || h === 'http:'), `${n}: a link that is not http(s): ${hrefs}`);
  }
});

// The server's default --max-body (the test server sets none).
const MAX_BODY = 8192;

await step('the counter shows bytes left; an over-long draft stays in the box', ['join'], async () => {
  await openPublic(alice);
  const box = alice.locator(T('composer'));
  const count = alice.locator(T('body-counter'));
  await box.fill('héllo 👋'); // 1 + 2 + 3 + 1 + 4 bytes
  await count.filter({ hasText: 'left' }).waitFor();
  const left = await count.getAttribute('data-left');
  assert(left === String(MAX_BODY - 11), `bytes left: ${left} (${await count.textContent()})`);
  const long = 'x'.repeat(MAX_BODY - 2) + '👋'; // two bytes over
  await box.fill(long);
  await alice.locator(`${T('body-counter')}.over`).filter({ hasText: '2 too many' }).waitFor();
  await box.press('Enter');
  await alice.locator(T('toast')).filter({ hasText: 'Too long' }).waitFor();
  assert((await box.inputValue()) === long, 'the over-long draft was cleared');
  await box.fill('');
  await count.waitFor({ state: 'hidden' });
});

await step('a draft the server refuses comes back to be shortened', [], async () => {
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 }, locale: 'en-US' });
  context.setDefaultTimeout(WAIT);
  // As from a server that does not announce its limit: the page cannot
  // count, sends, and the server answers body_too_long.
  await context.routeWebSocket(/\/ws\?/, (ws) => {
    const server = ws.connectToServer();
    server.onMessage((m) => {
      try {
        const v = JSON.parse(m);
        if (v.type === 'welcome') { delete v.limits; m = JSON.stringify(v); }
      } catch (e) { /* not JSON: as it is */ }
      ws.send(m);
    });
  });
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`frank: page error ${e.message}`));
  await page.goto(base + '/');
  await join(page, 'frank');
  await expectOnline(page);
  const box = page.locator(T('composer'));
  const long = 'y'.repeat(MAX_BODY) + ' and one more';
  await box.fill(long);
  assert(!(await page.locator(T('body-counter')).isVisible()), 'a counter without a known limit');
  await box.press('Enter');
  await page.locator(T('notice')).filter({ hasText: 'not sent' }).waitFor();
  assert((await box.inputValue()) === long, `the refused draft is not back: ${(await box.inputValue()).length} chars`);
  await context.close();
});

await step('reconnect after a dropped connection', ['join'], async () => {
  await bob.evaluate(() => window.wschat.drop());
  await bob.locator(`${T('conn-state')}[data-state="reconnecting"]`).waitFor();
  await expectOnline(bob);
  await person(alice, 'bob').waitFor();
  await openConv(alice, 'bob');
  await sendText(alice, 'after the reconnect');
  await messageWith(alice, 'after the reconnect').locator(`${T('message-status')}[data-status="delivered"]`).waitFor();
  await openConv(bob, 'alice');
  await messageWith(bob, 'after the reconnect').waitFor();
  noDuplicates(await ids(bob), 'bob after reconnect');
});

await step('bob reloads: history kept, nothing twice', ['private message alice -> bob (receipt, unread, Shift+Enter)'], async () => {
  await openConv(bob, 'alice');
  const before = await ids(bob);
  const beforeBodies = await bodies(bob);
  await openPublic(bob);
  const pubBefore = await ids(bob);
  await bob.reload();
  await expectOnline(bob); // the tab rejoins by itself
  await openPublic(bob);
  await messageWith(bob, 'hello everyone from carol').waitFor();
  const pubAfter = await ids(bob);
  noDuplicates(pubAfter, 'bob public after reload');
  assert(JSON.stringify(pubAfter) === JSON.stringify(pubBefore), `public history differs: ${pubBefore} vs ${pubAfter}`);
  await openConv(bob, 'alice');
  await messageWith(bob, 'second line').waitFor();
  const after = await ids(bob);
  noDuplicates(after, 'bob private after reload');
  assert(JSON.stringify(after) === JSON.stringify(before), `private history differs: ${before} vs ${after}`);
  assert(JSON.stringify(await bodies(bob)) === JSON.stringify(beforeBodies), 'bodies differ after reload');
  // a new message after the reload arrives once
  await sendText(alice, 'welcome back bob');
  await messageWith(bob, 'welcome back bob').waitFor();
  noDuplicates(await ids(bob), 'bob after reload + new message');
  assert((await messageWith(bob, 'welcome back bob').count()) === 1, 'new message shown once');
});

let dave;
await step('message to offline dave is queued, then delivered when he joins', ['join'], async () => {
  const search = alice.locator(T('people-search'));
  await search.fill('dave');
  await search.press('Enter');
  await alice.locator(T('conv-title')).filter({ hasText: '@dave' }).waitFor();
  await sendText(alice, 'dave, are you there? 🙂');
  const mine = messageWith(alice, 'are you there');
  const status = mine.locator(T('message-status'));
  await status.filter({ hasNotText: 'sending' }).waitFor();
  const st = await status.getAttribute('data-status');
  assert(st === 'queued', `receipt for an offline recipient is "${st}" (${await status.textContent()}), want queued`);
  dave = await newUser('dave');
  await join(dave, 'dave');
  await expectOnline(dave);
  await person(dave, 'alice').locator(T('unread')).filter({ hasText: '1' }).waitFor();
  await openConv(dave, 'alice');
  const got = messageWith(dave, 'are you there');
  await got.locator(T('offline-badge')).waitFor();
  await mine.locator(`${T('message-status')}[data-status="delivered"]`).waitFor();
});

await step('bob leaves; messages queued for him arrive once when he comes back', ['private message alice -> bob (receipt, unread, Shift+Enter)'], async () => {
  const bobContext = bob.context();
  await bob.close();
  await alice.locator(`${T('person')}[data-user="bob"][data-online="false"]`).waitFor();
  await openConv(alice, 'bob');
  await sendText(alice, 'while you were away (1)');
  await sendText(alice, 'while you were away (2)');
  for (const n of [1, 2]) {
    await messageWith(alice, `away (${n})`).locator(`${T('message-status')}[data-status="queued"]`).waitFor();
  }
  bob = await bobContext.newPage();
  bob.on('dialog', async (d) => { problems.push(`bob: dialog "${d.message()}"`); await d.dismiss(); });
  bob.on('pageerror', (e) => problems.push(`bob: page error ${e.message}`));
  pages.bob = bob;
  await bob.goto(base + '/');
  assert((await bob.locator(T('username-input')).inputValue()) === 'bob', 'the last name is offered again');
  await bob.locator(T('join-button')).click();
  await expectOnline(bob);
  await person(bob, 'alice').locator(T('unread')).filter({ hasText: '2' }).waitFor();
  await openConv(bob, 'alice');
  for (const n of [1, 2]) {
    const m = messageWith(bob, `away (${n})`);
    await m.locator(T('offline-badge')).waitFor();
    assert((await m.count()) === 1, `queued message ${n} shown ${await m.count()} times`);
    await messageWith(alice, `away (${n})`).locator(`${T('message-status')}[data-status="delivered"]`).waitFor();
  }
  await messageWith(bob, 'second line').waitFor(); // the older history is still there
  noDuplicates(await ids(bob), 'bob after coming back');
  // and once more after a reload: resume + de-duplication keep everything single
  const before = await ids(bob);
  await bob.reload();
  await expectOnline(bob);
  await openConv(bob, 'alice');
  await messageWith(bob, 'away (2)').waitFor();
  const after = await ids(bob);
  assert(JSON.stringify(after) === JSON.stringify(before), `history differs after reload: ${before} vs ${after}`);
});

// With a second server run with --auth jwt and a token minted for it.
const authBase = process.argv[4];
const authToken = process.argv[5];
if (authBase && authToken) {
  await step('signs in with a token in the fragment, which leaves the address bar', [], async () => {
    const context = await browser.newContext({ viewport: { width: 1000, height: 700 }, locale: 'en-US' });
    context.setDefaultTimeout(WAIT);
    const page = await context.newPage();
    page.on('pageerror', (e) => problems.push(`token user: page error ${e.message}`));
    await page.goto(authBase + '/#token=' + authToken);
    await expectOnline(page);
    const name = await page.locator(T('me')).textContent();
    assert(name === 'Zoë', `signed in as ${name}`);
    assert(!page.url().includes('token='), `the token stayed in the address bar: ${page.url()}`);
    // A renewal with the same token is answered, and the session stays.
    await page.evaluate((t) => window.wschat.renew(t), authToken);
    await page.getByText('Sign-in renewed').waitFor();
    await expectOnline(page);
    await context.close();
  });
}

await step('no page errors, no dialogs', [], async () => {
  assert(problems.length === 0, problems.join('; '));
});

await step('screenshots', ['join'], async () => {
  await openConv(alice, 'bob');
  const desktop = path.join(shotDir, 'conversation-desktop.png');
  await alice.screenshot({ path: desktop });
  console.log(`screenshot: ${desktop}`);
  await bob.setViewportSize({ width: 360, height: 740 });
  await bob.locator(T('sidebar-toggle')).waitFor();
  // the sidebar slides out of view at this width
  await bob.waitForFunction(() => document.querySelector('aside').getBoundingClientRect().right <= 0);
  const phone = path.join(shotDir, 'conversation-phone.png');
  await bob.screenshot({ path: phone });
  console.log(`screenshot: ${phone}`);
  await bob.locator(T('sidebar-toggle')).click();
  await bob.locator(`${T('sidebar-toggle')}[aria-expanded="true"]`).waitFor();
  await person(bob, 'alice').evaluate((el) => new Promise((ok) => {
    // wait for the slide-in transition to end
    const aside = el.closest('aside');
    if (aside.getBoundingClientRect().left >= 0) ok(); else aside.addEventListener('transitionend', () => ok(), { once: true });
  }));
  const side = path.join(shotDir, 'sidebar-phone.png');
  await bob.screenshot({ path: side });
  console.log(`screenshot: ${side}`);
  await person(bob, 'alice').click();
  await bob.locator(`${T('sidebar-toggle')}[aria-expanded="false"]`).waitFor();
});

await browser.close();
const passed = results.filter(([, ok]) => ok).length;
console.log(passed === results.length ? `e2e: all ${passed} steps ok` : `e2e: ${results.length - passed} of ${results.length} steps FAILED`);
process.exit(results.length === passed ? 0 : 1);
