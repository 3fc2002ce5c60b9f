"""The pack's workflows as ComfyUI's template browser shows them, in headless Chromium (runs under
$COMFYUI_PYTHON: aiohttp and Pillow come with ComfyUI's requirements).

usage: template_browser.py COMFY_URL thumbnails OUT_DIR
         Loads each shipped UI workflow, frames the nodes its template names (workflow_graphs.py
         TEMPLATES[...].shows) at the largest zoom that fits, and saves a square screenshot of them as
         OUT_DIR/<title>.jpg (512 px): the thumbnails shipped in workflows/.
       template_browser.py COMFY_URL browse SCREENSHOT_PNG
         Opens the template browser on the pack's category, saves a screenshot and prints one JSON
         line: the category's label and, per card, its title, description and whether its thumbnail
         loaded.
"""
from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import workflow_graphs as wg  # noqa: E402
from browser_check import APP, comfy_page, screenshot  # noqa: E402

THUMBNAIL_SIDE = 512
CARD = "template-workflow-"


async def thumbnails(comfy_url: str, out_dir: Path) -> dict:
    made = {}
    async with comfy_page(comfy_url, pixel_ratio=2) as page:
        # Without the node-source badges (a thumbnail shows the graph, not the pack's name), and with
        # text drawn at every zoom (the canvas leaves it out below a font size: the level of detail).
        settings = {"Comfy.NodeBadge.NodeSourceBadgeMode": "None", "LiteGraph.Canvas.MinFontSizeForLOD": 0}
        before = await page.evaluate(f"({json.dumps(list(settings))}).map(k => {APP}.extensionManager.setting.get(k))")
        for key, value in settings.items():
            await page.evaluate(f"{APP}.extensionManager.setting.set({json.dumps(key)}, {json.dumps(value)})")
        for name, template in wg.TEMPLATES.items():
            workflow = json.loads(wg.ui_path(name).read_text())
            await page.evaluate(f"{APP}.loadGraphData({json.dumps(workflow)})")
            await asyncio.sleep(1.5)
            clip = await page.evaluate(f"""(() => {{
                const app = {APP}, ids = {json.dumps([int(i) for i in template.shows])};
                const nodes = app.graph._nodes.filter(n => ids.includes(n.id));
                const title = 30, margin = 30;  // node title bars sit above pos
                const x0 = Math.min(...nodes.map(n => n.pos[0])) - margin;
                const y0 = Math.min(...nodes.map(n => n.pos[1])) - title - margin;
                const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])) + margin;
                const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1])) + margin;
                const side = Math.max(x1 - x0, y1 - y0);
                const box = app.canvas.canvas.getBoundingClientRect();
                const view = Math.min(box.width, box.height) - 20;
                const ds = app.canvas.ds;
                ds.scale = Math.min(1, view / side);
                ds.offset = [box.width / 2 / ds.scale - (x0 + x1) / 2, box.height / 2 / ds.scale - (y0 + y1) / 2];
                app.canvas.setDirty(true, true);
                const shown = side * ds.scale;
                return [box.left + box.width / 2 - shown / 2, box.top + box.height / 2 - shown / 2, shown, shown,
                        ds.scale];
            }})()""")
            *clip, zoom = clip
            await asyncio.sleep(1.5)
            png = out_dir / f"{template.title}.png"
            await screenshot(page, str(png), tuple(clip))
            image = Image.open(io.BytesIO(png.read_bytes())).convert("RGB")
            png.unlink()
            path = out_dir / f"{template.title}.jpg"
            image.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.LANCZOS).save(path, quality=88, optimize=True)
            made[template.title] = {"file": str(path), "canvas_zoom": zoom}
        for key, value in zip(settings, before):
            await page.evaluate(f"{APP}.extensionManager.setting.set({json.dumps(key)}, {json.dumps(value)})")
    return made


async def browse(comfy_url: str, screenshot_path: str) -> dict:
    titles = [t.title for t in wg.TEMPLATES.values()]
    async with comfy_page(comfy_url) as page:
        # The pack's category in the browser's list (its label from the pack's locales/).
        category_item = ("[...document.querySelectorAll('[role=\"listbox\"] [role=\"option\"], li, button')]"
                         ".find(e => ['IDDM privacy', 'comfyui-iddm'].includes(e.textContent.trim()))")
        # As a user opens it: the menu's Browse Templates (again if the first start's own template
        # dialog, closed by comfy_page, was still closing and swallowed the first request).
        for attempt in range(10):
            await page.evaluate(f"{APP}.extensionManager.command.execute('Comfy.BrowseTemplates')")
            try:
                await page.wait_for(f"!!{category_item}", 30)
                break
            except TimeoutError:
                if attempt == 9:
                    await screenshot(page, screenshot_path)
                    raise
        category = await page.evaluate(f"""(() => {{ const ours = {category_item};
            if (ours) {{ ours.scrollIntoView(); ours.click(); }}
            return ours ? ours.textContent.trim() : null; }})()""")
        selector = " , ".join(f'[data-testid="{CARD}{t}"]' for t in titles)
        await page.wait_for(f"document.querySelectorAll({json.dumps(selector)}).length === {len(titles)}", 300)
        # The browser only gives the cards in view their thumbnails (and takes them back when they
        # leave): each card is read while scrolled into view, as a user would see it.
        cards = []
        for index in range(len(titles)):
            card = f"document.querySelectorAll({json.dumps(selector)})[{index}]"
            await page.evaluate(f"{card}.scrollIntoView({{block: 'nearest'}})")
            try:
                await page.wait_for(f"(() => {{ const i = {card}.querySelector('img'); "
                                    "return i && i.getAttribute('src') && i.complete; })()", 60)
            except TimeoutError:
                pass  # reported as no thumbnail
            await asyncio.sleep(0.5)
            cards.append(await page.evaluate(f"""(c => {{
                const img = c.querySelector('img');
                return {{name: c.dataset.testid.slice({len(CARD)}), title: c.querySelector('h3')?.textContent.trim(),
                         description: c.querySelector('p')?.textContent.trim(),
                         thumbnail: img ? [img.naturalWidth, img.naturalHeight] : null,
                         title_lines: Math.round(c.querySelector('h3').getBoundingClientRect().height /
                                                 parseFloat(getComputedStyle(c.querySelector('h3')).lineHeight)),
                         title_cut: c.querySelector('h3').scrollWidth > c.querySelector('h3').clientWidth}};
            }})({card})"""))
        await page.evaluate(f"document.querySelector({json.dumps(selector)}).scrollIntoView({{block: 'nearest'}})")
        await asyncio.sleep(1.5)
        await screenshot(page, screenshot_path)
        return {"category": category, "cards": cards, "console_errors": page.console_errors}


if __name__ == "__main__":
    url, command, target = sys.argv[1:4]
    if command == "thumbnails":
        result = asyncio.run(thumbnails(url, Path(target)))
    else:
        result = asyncio.run(browse(url, target))
    print(json.dumps(result))
