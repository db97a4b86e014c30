// OHIF v3 in headless Chromium against a running archive and viewer (see run.py).
// Usage: node run.mjs <viewer-url> <studies.json> <out-dir>
// studies.json: [{"study": uid, "patientId": id}]; writes <out-dir>/report.json + screenshots.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

const [viewerUrl, studiesFile, outDir] = process.argv.slice(2);
const studies = JSON.parse(fs.readFileSync(studiesFile, 'utf8'));
fs.mkdirSync(outDir, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--use-gl=angle', '--use-angle=swiftshader', '--enable-unsafe-swiftshader'],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
const failures = [];
const requests = { total: 0, preflight: 0 };
page.on('request', (r) => { requests.total += 1; if (r.method() === 'OPTIONS') requests.preflight += 1; });
page.on('requestfailed', (r) => failures.push({ url: r.url(), error: r.failure()?.errorText }));
page.on('response', (r) => { if (r.status() >= 400) failures.push({ url: r.url(), status: r.status() }); });
const consoleErrors = [];
page.on('pageerror', (e) => consoleErrors.push(String(e)));

const report = { studyList: {}, studies: [], failures, requests, consoleErrors };

await page.goto(viewerUrl, { waitUntil: 'networkidle', timeout: 120000 });
await page.waitForTimeout(3000);
const listText = (await page.evaluate(() => document.body.innerText)).toLowerCase();
// OHIF's study list shows the patient name ("Family, Given") and "1-N of N".
for (const s of studies) report.studyList[s.patientName] = listText.includes(s.patientName.toLowerCase());
report.studyCount = (listText.match(/of (\d+)/) || [])[1] || null;
await page.screenshot({ path: path.join(outDir, 'study-list.png'), fullPage: true });

// Pixel statistics of every cornerstone canvas: blank means a single value everywhere.
const canvasStats = () => Array.from(document.querySelectorAll('canvas')).map((c) => {
  const ctx = c.getContext('2d');
  if (!ctx || !c.width || !c.height) return { width: c.width, height: c.height, distinct: 0 };
  const data = ctx.getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  let lit = 0;
  for (let i = 0; i < data.length; i += 4 * 7) {
    const v = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    seen.add(v);
    if (v !== 0) lit += 1;
    if (seen.size > 64 && lit > 64) break;
  }
  return { width: c.width, height: c.height, distinct: seen.size, lit };
});

for (const s of studies) {
  const url = `${viewerUrl}/viewer?StudyInstanceUIDs=${s.study}`;
  const entry = { study: s.study, patientId: s.patientId, canvases: [] };
  try {
    await page.goto(url, { waitUntil: 'networkidle', timeout: 120000 });
    await page.waitForSelector('canvas', { timeout: 60000 });
    for (let i = 0; i < 20; i += 1) {  // up to 20 s for the first image to be drawn
      entry.canvases = await page.evaluate(canvasStats);
      if (entry.canvases.some((c) => c.distinct > 8)) break;
      await page.waitForTimeout(1000);
    }
  } catch (e) {
    entry.error = String(e);
  }
  entry.drawn = entry.canvases.some((c) => c.distinct > 8);
  await page.screenshot({ path: path.join(outDir, `study-${s.study}.png`) });
  report.studies.push(entry);
}
await browser.close();
fs.writeFileSync(path.join(outDir, 'report.json'), JSON.stringify(report, null, 2));
