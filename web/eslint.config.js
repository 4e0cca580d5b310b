// ESLint flat config: typescript-eslint (type-aware) for src/, recommended JS rules for the Node tests.
import js from '@eslint/js';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default tseslint.config(
  // src/generated/ is rendered from the Rust types (its README); tsc still checks it.
  { ignores: ['dist/', 'node_modules/', 'src/generated/'] },
  js.configs.recommended,
  {
    files: ['src/**/*.ts', 'vite.config.ts'],
    extends: [...tseslint.configs.strictTypeChecked, ...tseslint.configs.stylisticTypeChecked],
    languageOptions: {
      globals: globals.browser,
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true }],
    },
  },
  {
    files: ['test/**/*.mjs', 'eslint.config.js', 'prettier.config.js'],
    languageOptions: { globals: { ...globals.node } },
    rules: {
      'no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
    },
  },
  {
    // Callbacks passed to page.evaluate() run in the browser.
    files: [
      'test/browser.test.mjs',
      'test/exec.test.mjs',
      'test/exec-ui.test.mjs',
      'test/preview.test.mjs',
    ],
    languageOptions: { globals: { ...globals.node, ...globals.browser } },
  },
);
